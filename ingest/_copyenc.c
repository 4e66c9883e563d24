/*
 * ingest._copyenc: row tuples -> one PostgreSQL binary COPY stream, in C.
 *
 * Why: asyncpg's copy_records_to_table encodes every value through its generic codec machinery
 * (a codec lookup and a Python-level call per value for some types), ~0.2 us a value; with
 * ~11 values a record that is a quarter of ingest's CPU. The values ingest's converters
 * produce are few and plain (exact str, int, float, bool, aware datetime, date, None), so a
 * loop over the tuples that writes the binary format directly costs a small fraction of that.
 *
 * Never a different result: any value that is not exactly one of those types, or not in the
 * column type's range, makes encode() return None and the caller lets asyncpg encode the whole
 * batch as before (so asyncpg's own errors and rules still apply to anything unusual).
 * tests/test_copyenc.py checks the bytes against what asyncpg sends for the same rows.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <locale.h>
#include <math.h>
#ifdef __APPLE__
#include <xlocale.h>
#endif
#include <string.h>

enum kind {
    K_TEXT = 0,
    K_BIGINT = 1,
    K_INTEGER = 2,
    K_DOUBLE = 3,
    K_BOOLEAN = 4,
    K_TIMESTAMPTZ = 5,
    K_DATE = 6,
    K_JSONB = 7,
    K_COUNT = 8
};

/* An array column: K_ARRAY | the element's kind (text, bigint, integer, double, boolean or
 * timestamptz), e.g. K_ARRAY | K_TEXT for text[]. Only encode() takes them (rows of Python
 * lists); encode_records() never sees them (the record encoder declines array tables). */
#define K_ARRAY 0x20
static int array_kind_ok(int kind) {
    int element = kind & ~K_ARRAY;
    return (kind & K_ARRAY) && (element == K_TEXT || element == K_BIGINT ||
                                element == K_INTEGER || element == K_DOUBLE ||
                                element == K_BOOLEAN || element == K_TIMESTAMPTZ);
}
/* PostgreSQL's element type oids, indexed by kind (0: no array of it here). */
static const uint32_t ELEMENT_OID[K_COUNT] = {25, 20, 23, 701, 16, 1184, 0, 0};

/* asyncpg's sentinels (pgproto codecs/datetime.pyx): datetime.max/min and date.max/min are
 * PostgreSQL's +/-infinity. */
#define PG_INFINITY_MICROS INT64_C(0x7FFFFFFFFFFFFFFF)
#define PG_NEG_INFINITY_MICROS (-INT64_C(0x7FFFFFFFFFFFFFFF) - 1)
#define INFINITY_MICROS INT64_C(252455615999999999)
#define NEG_INFINITY_MICROS INT64_C(-63082281600000000)
#define PG_DATE_INFINITY INT32_C(0x7FFFFFFF)
#define PG_DATE_NEG_INFINITY (-INT32_C(0x7FFFFFFF) - 1)
/* days_from_civil(2000, 1, 1) */
#define PG_EPOCH_DAYS INT64_C(10957)

/* The COPY stream being written, in the bytes object that will be returned: one allocation
 * per batch (grown by doubling, shrunk to size at the end), no copy. */
typedef struct {
    PyObject *bytes;
    char *data;
    size_t size;
    size_t capacity;
    /* raw: plain memory (PyMem_Raw*), usable without the GIL; a failure sets no exception */
    int raw;
} buffer;

static int reserve(buffer *out, size_t more) {
    if (out->size + more <= out->capacity) {
        return 0;
    }
    size_t capacity = out->capacity ? out->capacity : 65536;
    while (capacity < out->size + more) {
        if (capacity > ((size_t)PY_SSIZE_T_MAX) / 2) {
            if (!out->raw) PyErr_NoMemory();
            return -1;
        }
        capacity *= 2;
    }
    if (out->raw) {
        char *grown = PyMem_RawRealloc(out->data, capacity);
        if (grown == NULL) return -1;
        out->data = grown;
    } else if (out->bytes == NULL) {
        out->bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)capacity);
        if (out->bytes == NULL) return -1;
    } else if (_PyBytes_Resize(&out->bytes, (Py_ssize_t)capacity) < 0) {
        return -1; /* the bytes object is freed and out->bytes is NULL */
    }
    if (!out->raw) out->data = PyBytes_AS_STRING(out->bytes);
    out->capacity = capacity;
    return 0;
}

/* The written stream as bytes (the buffer gives it up), or NULL with an error set. */
static PyObject *finish(buffer *out) {
    PyObject *result = out->bytes;
    out->bytes = NULL;
    if (result != NULL && _PyBytes_Resize(&result, (Py_ssize_t)out->size) < 0) return NULL;
    return result;
}

static inline void put_u16(buffer *out, uint16_t value) {
    unsigned char *at = (unsigned char *)out->data + out->size;
    at[0] = (unsigned char)(value >> 8);
    at[1] = (unsigned char)value;
    out->size += 2;
}

static inline void put_u32(buffer *out, uint32_t value) {
    unsigned char *at = (unsigned char *)out->data + out->size;
    at[0] = (unsigned char)(value >> 24);
    at[1] = (unsigned char)(value >> 16);
    at[2] = (unsigned char)(value >> 8);
    at[3] = (unsigned char)value;
    out->size += 4;
}

static inline void put_u64(buffer *out, uint64_t value) {
    put_u32(out, (uint32_t)(value >> 32));
    put_u32(out, (uint32_t)value);
}

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t year, int64_t month, int64_t day) {
    year -= month <= 2;
    int64_t era = (year >= 0 ? year : year - 399) / 400;
    int64_t year_of_era = year - era * 400;
    int64_t day_of_year = (153 * (month + (month > 2 ? -3 : 9)) + 2) / 5 + day - 1;
    int64_t day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    return era * 146097 + day_of_era - 719468;
}

/* The UTC offset of an aware datetime in microseconds; 0 = done, 1 = refuse, -1 = error. */
static int utc_offset(PyObject *value, int64_t *micros) {
    if (PyDateTime_DATE_GET_TZINFO(value) == PyDateTime_TimeZone_UTC) {
        *micros = 0;
        return 0;
    }
    PyObject *offset = PyObject_CallMethod(value, "utcoffset", NULL);
    if (offset == NULL) {
        return -1;
    }
    if (!PyDelta_Check(offset)) { /* None: not aware after all */
        Py_DECREF(offset);
        return 1;
    }
    *micros = ((int64_t)PyDateTime_DELTA_GET_DAYS(offset) * 86400 +
               PyDateTime_DELTA_GET_SECONDS(offset)) * 1000000 +
              PyDateTime_DELTA_GET_MICROSECONDS(offset);
    Py_DECREF(offset);
    return 0;
}

/* The typed values both encoders write; 0 = written, 1 = refuse, -1 = error set. */
static int put_integer(buffer *out, int kind, int64_t number) {
    if (kind == K_BIGINT) {
        if (reserve(out, 12) < 0) return -1;
        put_u32(out, 8);
        put_u64(out, (uint64_t)number);
        return 0;
    }
    if (number < INT32_MIN || number > INT32_MAX) return 1;
    if (reserve(out, 8) < 0) return -1;
    put_u32(out, 4);
    put_u32(out, (uint32_t)(int32_t)number);
    return 0;
}

static int put_double(buffer *out, double number) {
    uint64_t bits;
    memcpy(&bits, &number, sizeof bits);
    if (reserve(out, 12) < 0) return -1;
    put_u32(out, 8);
    put_u64(out, bits);
    return 0;
}

static int put_boolean(buffer *out, int flag) {
    if (reserve(out, 5) < 0) return -1;
    put_u32(out, 1);
    out->data[out->size++] = (char)(flag != 0);
    return 0;
}

/* Microseconds since 2000-01-01 UTC; asyncpg's infinity sentinels mapped as it maps them. */
static int put_micros(buffer *out, int64_t micros) {
    if (micros == INFINITY_MICROS) {
        micros = PG_INFINITY_MICROS;
    } else if (micros == NEG_INFINITY_MICROS) {
        micros = PG_NEG_INFINITY_MICROS;
    }
    if (reserve(out, 12) < 0) return -1;
    put_u32(out, 8);
    put_u64(out, (uint64_t)micros);
    return 0;
}

/* A valid date; date.max/min are PostgreSQL's +/-infinity, as asyncpg sends them. */
static int put_date(buffer *out, int year, int month, int day) {
    int32_t days;
    if (year == 9999 && month == 12 && day == 31) {
        days = PG_DATE_INFINITY;
    } else if (year == 1 && month == 1 && day == 1) {
        days = PG_DATE_NEG_INFINITY;
    } else {
        days = (int32_t)(days_from_civil(year, month, day) - PG_EPOCH_DAYS);
    }
    if (reserve(out, 8) < 0) return -1;
    put_u32(out, 4);
    put_u32(out, (uint32_t)days);
    return 0;
}

/* Inlined into encode()'s row loop (its hot path), even now that put_array calls it too. */
#if defined(__GNUC__) || defined(__clang__)
#define HOT_INLINE inline __attribute__((always_inline))
#else
#define HOT_INLINE inline
#endif

/* One value; 0 = written, 1 = refuse (asyncpg decides), -1 = error set. */
static HOT_INLINE int put_value(buffer *out, int kind, PyObject *value) {
    if (value == Py_None) {
        if (reserve(out, 4) < 0) return -1;
        put_u32(out, UINT32_C(0xFFFFFFFF));
        return 0;
    }
    switch (kind) {
    case K_TEXT:
    case K_JSONB: {
        if (!PyUnicode_CheckExact(value)) return 1;
        Py_ssize_t length;
        const char *utf8 = PyUnicode_AsUTF8AndSize(value, &length);
        if (utf8 == NULL) { /* lone surrogates: let asyncpg report it */
            PyErr_Clear();
            return 1;
        }
        size_t total = (size_t)length + (kind == K_JSONB);
        if (total > INT32_MAX) return 1;
        if (reserve(out, 4 + total) < 0) return -1;
        put_u32(out, (uint32_t)total);
        if (kind == K_JSONB) out->data[out->size++] = 1; /* jsonb binary format version */
        memcpy(out->data + out->size, utf8, (size_t)length);
        out->size += (size_t)length;
        return 0;
    }
    case K_BIGINT:
    case K_INTEGER: {
        if (!PyLong_CheckExact(value)) return 1;
        int overflow;
        long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) return 1;
        if (number == -1 && PyErr_Occurred()) return -1;
        return put_integer(out, kind, number);
    }
    case K_DOUBLE:
        if (!PyFloat_CheckExact(value)) return 1;
        return put_double(out, PyFloat_AS_DOUBLE(value));
    case K_BOOLEAN:
        if (value != Py_True && value != Py_False) return 1;
        return put_boolean(out, value == Py_True);
    case K_TIMESTAMPTZ: {
        if (!PyDateTime_CheckExact(value)) return 1;
        if (PyDateTime_DATE_GET_TZINFO(value) == Py_None) {
            return 1; /* naive: asyncpg's local-time rules */
        }
        int64_t offset;
        int status = utc_offset(value, &offset);
        if (status != 0) return status;
        int64_t days = days_from_civil(PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value),
                                       PyDateTime_GET_DAY(value)) - PG_EPOCH_DAYS;
        int64_t seconds = days * 86400 + PyDateTime_DATE_GET_HOUR(value) * 3600 +
                          PyDateTime_DATE_GET_MINUTE(value) * 60 +
                          PyDateTime_DATE_GET_SECOND(value);
        return put_micros(out, seconds * 1000000 + PyDateTime_DATE_GET_MICROSECOND(value) - offset);
    }
    case K_DATE:
        if (!PyDate_CheckExact(value)) return 1;
        return put_date(out, PyDateTime_GET_YEAR(value), PyDateTime_GET_MONTH(value),
                        PyDateTime_GET_DAY(value));
    default:
        return 1;
    }
}

/* A one-dimensional array (a list), in asyncpg's layout: ndims 1, flags 0, the element oid,
 * the length with lower bound 1, then each element as a field (NULL as -1). */
static int put_array(buffer *out, int element, PyObject *value) {
    if (!PyList_CheckExact(value)) return 1;
    if (reserve(out, 24) < 0) return -1;
    size_t start = out->size;
    out->size += 4; /* the field's length, written below */
    put_u32(out, 1);
    put_u32(out, 0);
    put_u32(out, ELEMENT_OID[element]);
    /* A Python converter's own list, but a tzinfo's utcoffset() is Python code: hold it. */
    Py_INCREF(value);
    Py_ssize_t length = PyList_GET_SIZE(value);
    if (length > INT32_MAX / 4) { /* more than PostgreSQL's MaxAllocSize of NULLs anyway */
        Py_DECREF(value);
        return 1;
    }
    put_u32(out, (uint32_t)length);
    put_u32(out, 1);
    int status = 0;
    for (Py_ssize_t index = 0; index < length && status == 0; index++) {
        if (index >= PyList_GET_SIZE(value)) {
            status = 1; /* changed under us: asyncpg decides */
            break;
        }
        PyObject *item = PyList_GET_ITEM(value, index);
        Py_INCREF(item);
        status = put_value(out, element, item);
        Py_DECREF(item);
    }
    if (status == 0 && PyList_GET_SIZE(value) != length) status = 1;
    Py_DECREF(value);
    if (status != 0) return status;
    size_t total = out->size - start - 4;
    if (total > INT32_MAX) return 1;
    uint32_t big = (uint32_t)total;
    out->data[start] = (char)(big >> 24);
    out->data[start + 1] = (char)(big >> 16);
    out->data[start + 2] = (char)(big >> 8);
    out->data[start + 3] = (char)big;
    return 0;
}

static const char SIGNATURE[11] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', '\xff', '\r', '\n', '\0'};

PyDoc_STRVAR(encode_doc,
"encode(rows, kinds) -> bytes | None\n\n"
"One binary COPY stream (header, tuples, trailer) of ``rows``, each a tuple with one value per\n"
"entry of ``kinds`` (the KIND codes), or None when any value is not one this encoder takes\n"
"exactly as asyncpg would: the caller then lets asyncpg encode the rows.");

static PyObject *encode(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *rows_arg;
    PyObject *kinds_arg;
    if (!PyArg_ParseTuple(args, "OO!:encode", &rows_arg, &PyBytes_Type, &kinds_arg)) {
        return NULL;
    }
    Py_ssize_t columns = PyBytes_GET_SIZE(kinds_arg);
    const unsigned char *kinds = (const unsigned char *)PyBytes_AS_STRING(kinds_arg);
    int arrays = 0; /* any array column: the scalar-only loop below stays as it was */
    if (columns > 1600) { /* PostgreSQL's own limit; the tuple header is 16 bits */
        PyErr_SetString(PyExc_ValueError, "more than 1600 columns");
        return NULL;
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        if (kinds[column] >= K_COUNT && !array_kind_ok(kinds[column])) {
            PyErr_Format(PyExc_ValueError, "unknown column kind %d", (int)kinds[column]);
            return NULL;
        }
        if (kinds[column] & K_ARRAY) arrays = 1;
    }
    /* A tuple of our own, not the caller's list: a tzinfo's utcoffset() is Python code that
       may empty or change that list while its rows and values are in use here. */
    PyObject *rows = PySequence_Tuple(rows_arg);
    if (rows == NULL) {
        return NULL;
    }
    buffer out = {NULL, NULL, 0, 0, 0};
    int status = 0;
    if (reserve(&out, sizeof SIGNATURE + 8) < 0) {
        status = -1;
        goto done;
    }
    memcpy(out.data, SIGNATURE, sizeof SIGNATURE);
    out.size = sizeof SIGNATURE;
    put_u32(&out, 0); /* flags */
    put_u32(&out, 0); /* header extension length */
    Py_ssize_t count = PySequence_Fast_GET_SIZE(rows);
    PyObject **items = PySequence_Fast_ITEMS(rows);
    for (Py_ssize_t index = 0; index < count && status == 0; index++) {
        PyObject *row = items[index];
        if (!PyTuple_CheckExact(row) || PyTuple_GET_SIZE(row) != columns) {
            status = 1;
            break;
        }
        if (reserve(&out, 2) < 0) {
            status = -1;
            break;
        }
        put_u16(&out, (uint16_t)columns);
        if (arrays) {
            for (Py_ssize_t column = 0; column < columns; column++) {
                int kind = kinds[column];
                PyObject *value = PyTuple_GET_ITEM(row, column);
                if ((kind & K_ARRAY) && value != Py_None) {
                    status = put_array(&out, kind & ~K_ARRAY, value);
                } else {
                    status = put_value(&out, kind, value);
                }
                if (status != 0) break;
            }
            continue;
        }
        for (Py_ssize_t column = 0; column < columns; column++) {
            status = put_value(&out, kinds[column], PyTuple_GET_ITEM(row, column));
            if (status != 0) break;
        }
    }
    if (status == 0) {
        if (reserve(&out, 2) < 0) {
            status = -1;
        } else {
            put_u16(&out, UINT16_C(0xFFFF));
        }
    }
done:
    Py_DECREF(rows);
    PyObject *result = NULL;
    if (status == 0) {
        result = finish(&out);
    } else if (status == 1) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(out.bytes);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* JSON records -> COPY tuples, without building a Python object per value.                    */
/*                                                                                              */
/* The records are the page's record objects as raw JSON text (msgspec.Raw). Each column is a  */
/* path of object keys; the value found there is converted only where the Python path's        */
/* conversion is unambiguous (see ingest/native.py): any other value, any record that is not   */
/* an object, anything malformed makes encode_records() return None and the caller converts    */
/* the batch the usual way, dead letters included.                                             */
/* ------------------------------------------------------------------------------------------ */

enum token { T_MISSING = 0, T_NULL, T_STR, T_INT, T_FLOAT, T_TRUE, T_FALSE, T_OBJ, T_ARR };

/* flags of a value, gathered while it is parsed */
#define F_ESCAPE 1     /* a string (or, for containers, some string) has a backslash escape */
#define F_FLOAT 2      /* a number with a fraction or exponent inside a container */
#define F_LONGINT 4    /* an integer of more than 18 digits inside a container */
#define F_NUL 8        /* an escaped NUL (\u0000) somewhere */

#define MAX_DEPTH 64
#define K_CURSOR 100   /* a slot read for the cursor value, not written */
#define K_RAW 101      /* the record itself, as jsonb */

typedef struct {
    const char *start;
    Py_ssize_t length;
    int token;
    int flags;
} span;

/* The column paths as a tree of object keys. */
typedef struct {
    const char *key;
    Py_ssize_t key_length;
    int child;      /* node index, or -1 */
    int first_slot; /* first slot read from this key, or -1; more via next_slot[] */
} entry;

typedef struct {
    int first_entry;
    int entries;
} node;

typedef struct {
    node *nodes;
    int node_count;
    entry *entries;
    int entry_count;
    int *next_slot;
    /* slots reset when an object at this node is entered: [slot_begin, slot_end) of a
       per-node list */
    int *subtree_slots;
    int *subtree_begin;
    int *subtree_end;
    span *slots;
    int slot_count;
} paths;

static inline const char *skip_ws(const char *p, const char *end) {
    if (p < end && (unsigned char)*p > ' ') return p; /* compact JSON: the usual case */
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static inline int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int hex4(const char *p, const char *end) {
    if (end - p < 4) return -1;
    int value = 0;
    for (int i = 0; i < 4; i++) {
        int digit = hex_value(p[i]);
        if (digit < 0) return -1;
        value = value * 16 + digit;
    }
    return value;
}

/* Length of a valid UTF-8 sequence at p (first byte >= 0x80), or 0. */
static int utf8_sequence(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    int length;
    unsigned int min;
    unsigned int code;
    if (c >= 0xC2 && c <= 0xDF) {
        length = 2; min = 0x80; code = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        length = 3; min = 0x800; code = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        length = 4; min = 0x10000; code = c & 0x07;
    } else {
        return 0;
    }
    if (end - p < length) return 0;
    for (int i = 1; i < length; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        code = (code << 6) | (p[i] & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return 0;
    return length;
}

/* 1 for bytes a JSON string may hold as they are: printable ASCII but the quote and backslash */
static unsigned char PLAIN[256];

static void init_plain(void) {
    for (int c = 0x20; c < 0x80; c++) PLAIN[c] = c != '"' && c != '\\';
}

/* A string token at p (the opening quote); the end past its closing quote, or NULL. */
static const char *parse_string(const char *p, const char *end, int *flags) {
    p++;
    while (p < end) {
        /* four bytes a step while all four are plain: most of a record's bytes are in strings */
        while (end - p >= 4 && (PLAIN[(unsigned char)p[0]] & PLAIN[(unsigned char)p[1]] &
                                PLAIN[(unsigned char)p[2]] & PLAIN[(unsigned char)p[3]]))
            p += 4;
        while (p < end && PLAIN[(unsigned char)*p]) p++;
        if (p >= end) return NULL;
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c == '\\') {
            if (end - p < 2) return NULL;
            char escape = p[1];
            if (escape == 'u') {
                int code = hex4(p + 2, end);
                if (code < 0) return NULL;
                p += 6;
                if (code == 0) *flags |= F_NUL;
                if (code >= 0xDC00 && code <= 0xDFFF) return NULL; /* a lone low surrogate */
                if (code >= 0xD800 && code <= 0xDBFF) {
                    if (end - p < 6 || p[0] != '\\' || p[1] != 'u') return NULL;
                    int low = hex4(p + 2, end);
                    if (low < 0xDC00 || low > 0xDFFF) return NULL;
                    p += 6;
                }
            } else if (escape == '"' || escape == '\\' || escape == '/' || escape == 'b' ||
                       escape == 'f' || escape == 'n' || escape == 'r' || escape == 't') {
                p += 2;
            } else {
                return NULL;
            }
            *flags |= F_ESCAPE;
        } else if (c < 0x20) {
            return NULL;
        } else if (c < 0x80) {
            p++;
        } else {
            int length = utf8_sequence((const unsigned char *)p, (const unsigned char *)end);
            if (length == 0) return NULL;
            p += length;
        }
    }
    return NULL;
}

/* The unescaped UTF-8 of a valid string token (quotes included in token) into out; returns
   the length written (never more than the token's). */
static Py_ssize_t unescape(const char *token, Py_ssize_t length, char *out) {
    const char *p = token + 1;
    const char *end = token + length - 1;
    char *o = out;
    while (p < end) {
        if (*p != '\\') {
            *o++ = *p++;
            continue;
        }
        char escape = p[1];
        unsigned int code;
        switch (escape) {
        case 'b': *o++ = '\b'; p += 2; continue;
        case 'f': *o++ = '\f'; p += 2; continue;
        case 'n': *o++ = '\n'; p += 2; continue;
        case 'r': *o++ = '\r'; p += 2; continue;
        case 't': *o++ = '\t'; p += 2; continue;
        case 'u':
            code = (unsigned int)hex4(p + 2, end);
            p += 6;
            if (code >= 0xD800 && code <= 0xDBFF) {
                unsigned int low = (unsigned int)hex4(p + 2, end);
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                p += 6;
            }
            if (code < 0x80) {
                *o++ = (char)code;
            } else if (code < 0x800) {
                *o++ = (char)(0xC0 | (code >> 6));
                *o++ = (char)(0x80 | (code & 0x3F));
            } else if (code < 0x10000) {
                *o++ = (char)(0xE0 | (code >> 12));
                *o++ = (char)(0x80 | ((code >> 6) & 0x3F));
                *o++ = (char)(0x80 | (code & 0x3F));
            } else {
                *o++ = (char)(0xF0 | (code >> 18));
                *o++ = (char)(0x80 | ((code >> 12) & 0x3F));
                *o++ = (char)(0x80 | ((code >> 6) & 0x3F));
                *o++ = (char)(0x80 | (code & 0x3F));
            }
            continue;
        default: /* " \ / */
            *o++ = escape;
            p += 2;
            continue;
        }
    }
    return o - out;
}

static const char *parse_number(const char *p, const char *end, int *token, int *digits) {
    const char *start = p;
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return NULL;
    }
    *digits = (int)(p - start) - (*start == '-');
    *token = T_INT;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *token = T_FLOAT;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
        *token = T_FLOAT;
    }
    return p;
}

static int literal(const char *p, const char *end, const char *word, Py_ssize_t length) {
    return end - p >= length && memcmp(p, word, (size_t)length) == 0;
}

static const char *parse_value(const char *p, const char *end, int depth, span *value);

/* An object or array at p, any contents; flags of everything inside go to value->flags. */
static const char *parse_container(const char *p, const char *end, int depth, span *value) {
    if (depth > MAX_DEPTH) return NULL;
    char close = *p == '{' ? '}' : ']';
    p = skip_ws(p + 1, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        span inner;
        if (close == '}') {
            if (p >= end || *p != '"') return NULL;
            p = parse_string(p, end, &value->flags);
            if (p == NULL) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
        }
        p = parse_value(p, end, depth + 1, &inner);
        if (p == NULL) return NULL;
        value->flags |= inner.flags;
        if (inner.token == T_FLOAT) value->flags |= F_FLOAT;
        if (inner.token == T_INT && inner.length > 18 + (inner.start[0] == '-'))
            value->flags |= F_LONGINT;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (*p == close) return p + 1;
        return NULL;
    }
}

static const char *parse_value(const char *p, const char *end, int depth, span *value) {
    value->start = p;
    value->flags = 0;
    if (p >= end) return NULL;
    const char *after;
    int digits;
    switch (*p) {
    case '"':
        value->token = T_STR;
        after = parse_string(p, end, &value->flags);
        break;
    case '{':
        value->token = T_OBJ;
        after = parse_container(p, end, depth, value);
        break;
    case '[':
        value->token = T_ARR;
        after = parse_container(p, end, depth, value);
        break;
    case 't':
        value->token = T_TRUE;
        after = literal(p, end, "true", 4) ? p + 4 : NULL;
        break;
    case 'f':
        value->token = T_FALSE;
        after = literal(p, end, "false", 5) ? p + 5 : NULL;
        break;
    case 'n':
        value->token = T_NULL;
        after = literal(p, end, "null", 4) ? p + 4 : NULL;
        break;
    default:
        after = parse_number(p, end, &value->token, &digits);
        break;
    }
    if (after != NULL) value->length = after - p;
    return after;
}

static void reset_subtree(paths *tree, int node_index) {
    for (int i = tree->subtree_begin[node_index]; i < tree->subtree_end[node_index]; i++) {
        tree->slots[tree->subtree_slots[i]].token = T_MISSING;
    }
}

/* The object at p read into the slots of node_index's paths; 0 ok, 1 refuse. The record's
   overall flags (NUL escapes) go to *flags. */
static int read_object(paths *tree, int node_index, const char *p, const char *end, int depth,
                       int *flags, const char **after) {
    if (depth > MAX_DEPTH || p >= end || *p != '{') return 1;
    const node *at = &tree->nodes[node_index];
    int expected = 0; /* the entry the next key is likely to match */
    char key_buffer[256];
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        *after = p + 1;
        return 0;
    }
    for (;;) {
        if (p >= end || *p != '"') return 1;
        int key_flags = 0;
        const char *key_end = parse_string(p, end, &key_flags);
        if (key_end == NULL) return 1;
        *flags |= key_flags;
        const char *key = p + 1;
        Py_ssize_t key_length = key_end - p - 2;
        char *key_heap = NULL; /* an escaped key longer than key_buffer, unescaped */
        if (key_flags & F_ESCAPE) {
            /* The unescaped key is never longer than its token (quotes included). A long
               token may still unescape to a configured key (\u escapes take six bytes a
               character), so it is unescaped on the heap, never skipped. */
            char *into = key_buffer;
            if (key_end - p > (Py_ssize_t)sizeof key_buffer) {
                key_heap = PyMem_RawMalloc((size_t)(key_end - p));
                if (key_heap == NULL) return 1; /* no memory: refuse, the Python path decides */
                into = key_heap;
            }
            key_length = unescape(p, key_end - p, into);
            key = into;
        }
        p = skip_ws(key_end, end);
        if (p >= end || *p != ':') {
            PyMem_RawFree(key_heap);
            return 1;
        }
        p = skip_ws(p + 1, end);
        const entry *match = NULL;
        if (key != NULL) {
            /* Records of one API mostly send their keys in one order, so the entry after the
               last match is tried first; a miss there falls back to the whole list. */
            const entry *guess =
                expected < at->entries ? &tree->entries[at->first_entry + expected] : NULL;
            if (guess != NULL && guess->key_length == key_length &&
                memcmp(guess->key, key, (size_t)key_length) == 0) {
                match = guess;
                expected++;
            } else {
                for (int i = 0; i < at->entries; i++) {
                    const entry *candidate = &tree->entries[at->first_entry + i];
                    if (candidate->key_length == key_length &&
                        memcmp(candidate->key, key, (size_t)key_length) == 0) {
                        match = candidate;
                        expected = i + 1;
                        break;
                    }
                }
            }
        }
        PyMem_RawFree(key_heap); /* only the key's bytes were needed, for the match */
        span value;
        if (match != NULL && match->child >= 0) {
            /* a later duplicate of the key replaces the earlier object, as in a dict */
            reset_subtree(tree, match->child);
            if (p < end && *p == '{') {
                const char *inner_end;
                if (read_object(tree, match->child, p, end, depth + 1, flags, &inner_end))
                    return 1;
                value.start = p;
                value.length = inner_end - p;
                value.token = T_OBJ;
                value.flags = 0;
                if (match->first_slot >= 0) { /* also read whole: re-parse for its flags */
                    if (parse_value(p, end, depth, &value) == NULL) return 1;
                }
                p = inner_end;
            } else {
                p = parse_value(p, end, depth + 1, &value);
                if (p == NULL) return 1;
                if (value.token != T_NULL) return 1; /* a path through a non-object */
            }
        } else {
            p = parse_value(p, end, depth + 1, &value);
            if (p == NULL) return 1;
        }
        *flags |= value.flags & F_NUL;
        if (match != NULL) {
            for (int slot = match->first_slot; slot >= 0; slot = tree->next_slot[slot]) {
                tree->slots[slot] = value;
            }
        }
        p = skip_ws(p, end);
        if (p >= end) return 1;
        if (*p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (*p == '}') {
            *after = p + 1;
            return 0;
        }
        return 1;
    }
}

static int digits_at(const char *p, int count, int *value) {
    int number = 0;
    for (int i = 0; i < count; i++) {
        if (p[i] < '0' || p[i] > '9') return 0;
        number = number * 10 + (p[i] - '0');
    }
    *value = number;
    return 1;
}

static int days_in_month(int year, int month) {
    static const int days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (month == 2 && (year % 4 == 0 && (year % 100 != 0 || year % 400 == 0))) return 29;
    return days[month - 1];
}

/* YYYY-MM-DD at p; 0 = refuse. */
static int parse_date_at(const char *p, int *year, int *month, int *day) {
    if (p[4] != '-' || p[7] != '-') return 0;
    if (!digits_at(p, 4, year) || !digits_at(p + 5, 2, month) || !digits_at(p + 8, 2, day))
        return 0;
    if (*year < 1 || *month < 1 || *month > 12 || *day < 1 ||
        *day > days_in_month(*year, *month))
        return 0;
    return 1;
}

/* The subset of ISO 8601 where datetime.fromisoformat (Python 3.11+) is unambiguous:
   YYYY-MM-DD[T ]HH:MM:SS[.f{1,6}][Z|+HH:MM|-HH:MM]; naive means UTC, as ingest converts. */
static int parse_timestamp(const char *p, Py_ssize_t length, int64_t *micros) {
    int year, month, day, hour, minute, second, fraction = 0;
    if (length < 19 || !parse_date_at(p, &year, &month, &day)) return 0;
    if (p[10] != 'T' && p[10] != ' ') return 0;
    if (p[13] != ':' || p[16] != ':') return 0;
    if (!digits_at(p + 11, 2, &hour) || !digits_at(p + 14, 2, &minute) ||
        !digits_at(p + 17, 2, &second))
        return 0;
    if (hour > 23 || minute > 59 || second > 59) return 0;
    Py_ssize_t at = 19;
    if (at < length && p[at] == '.') {
        at++;
        int count = 0;
        while (at < length && p[at] >= '0' && p[at] <= '9' && count < 7) {
            fraction = fraction * 10 + (p[at] - '0');
            at++;
            count++;
        }
        if (count < 1 || count > 6) return 0;
        for (; count < 6; count++) fraction *= 10;
    }
    int64_t offset = 0;
    if (at < length) {
        if (p[at] == 'Z') {
            at++;
        } else if (p[at] == '+' || p[at] == '-') {
            int offset_hours, offset_minutes;
            if (length - at != 6 || p[at + 3] != ':') return 0;
            if (!digits_at(p + at + 1, 2, &offset_hours) ||
                !digits_at(p + at + 4, 2, &offset_minutes))
                return 0;
            if (offset_hours > 23 || offset_minutes > 59) return 0;
            offset = ((int64_t)offset_hours * 3600 + offset_minutes * 60) * 1000000;
            if (p[at] == '-') offset = -offset;
            at += 6;
        } else {
            return 0;
        }
    }
    if (at != length) return 0;
    int64_t days = days_from_civil(year, month, day) - PG_EPOCH_DAYS;
    int64_t seconds = days * 86400 + hour * 3600 + minute * 60 + second;
    *micros = seconds * 1000000 + fraction - offset;
    return 1;
}

static int parse_int64(const char *p, Py_ssize_t length, int64_t *value) {
    int negative = p[0] == '-';
    Py_ssize_t digits = length - negative;
    if (digits > 19) return 0;
    uint64_t number = 0;
    for (Py_ssize_t i = negative; i < length; i++) {
        uint64_t digit = (uint64_t)(p[i] - '0');
        if (number > (UINT64_MAX - digit) / 10) return 0;
        number = number * 10 + digit;
    }
    if (negative) {
        if (number > (uint64_t)INT64_MAX + 1) return 0;
        *value = (int64_t)(0 - number);
    } else {
        if (number > (uint64_t)INT64_MAX) return 0;
        *value = (int64_t)number;
    }
    return 1;
}

/* Exact powers of ten as doubles (10^22 is the largest one a double holds exactly). */
static const double POWERS_OF_TEN[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                         1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                         1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Clinger's fast path: digits below 2^53 scaled by an exact power of ten is one correctly
   rounded IEEE operation, so the same double as a full conversion; 0 = take the slow path. */
static int fast_double(const char *p, Py_ssize_t length, double *value) {
    const char *end = p + length;
    int negative = *p == '-';
    if (negative) p++;
    uint64_t digits = 0;
    int count = 0, scale = 0;
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        if (digits || *p != '0') count++;
        digits = digits * 10 + (uint64_t)(*p - '0');
        if (count > 15) return 0;
    }
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++) {
            if (digits || *p != '0') count++;
            digits = digits * 10 + (uint64_t)(*p - '0');
            scale--;
            if (count > 15) return 0;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        int exponent_negative = 0;
        if (p < end && (*p == '+' || *p == '-')) exponent_negative = *p++ == '-';
        int exponent = 0;
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
            exponent = exponent * 10 + (*p - '0');
            if (exponent > 400) return 0;
        }
        scale += exponent_negative ? -exponent : exponent;
    }
    if (p != end || scale < -22 || scale > 22) return 0;
    double number = (double)digits; /* exact: fewer than 16 digits */
    number = scale < 0 ? number / POWERS_OF_TEN[-scale] : number * POWERS_OF_TEN[scale];
    *value = negative ? -number : number;
    return 1;
}

/* The "C" locale, so a decimal point is a point whatever the process's locale. */
static locale_t C_LOCALE;

/* A number token as Python's float() reads it (both correctly rounded); 0 = refuse (too long,
   or not finite). Needs no GIL. */
static int parse_double(const char *p, Py_ssize_t length, double *value) {
    if (fast_double(p, length, value)) return 1;
    char text[64];
    if (length >= (Py_ssize_t)sizeof text) return 0;
    memcpy(text, p, (size_t)length);
    text[length] = '\0';
    char *end;
    double number = strtod_l(text, &end, C_LOCALE);
    if (end != text + length || !isfinite(number)) return 0;
    *value = number;
    return 1;
}

/* One column's value from its span; 0 = written, 1 = refuse, -1 = error. */
static int put_json_value(buffer *out, int kind, int required, const span *value) {
    if (value->token == T_MISSING || value->token == T_NULL) {
        if (required) return 1;
        if (reserve(out, 4) < 0) return -1;
        put_u32(out, UINT32_C(0xFFFFFFFF));
        return 0;
    }
    switch (kind) {
    case K_TEXT: {
        if (value->token != T_STR || (value->flags & F_NUL)) return 1;
        Py_ssize_t room = value->length - 2;
        if (room > INT32_MAX) return 1;
        if (reserve(out, 4 + (size_t)room) < 0) return -1;
        size_t length_at = out->size;
        out->size += 4;
        Py_ssize_t length;
        if (value->flags & F_ESCAPE) {
            length = unescape(value->start, value->length, out->data + out->size);
        } else {
            memcpy(out->data + out->size, value->start + 1, (size_t)room);
            length = room;
        }
        out->size += (size_t)length;
        size_t end = out->size;
        out->size = length_at;
        put_u32(out, (uint32_t)length);
        out->size = end;
        return 0;
    }
    case K_BIGINT:
    case K_INTEGER: {
        int64_t number;
        if (value->token != T_INT || !parse_int64(value->start, value->length, &number))
            return 1;
        return put_integer(out, kind, number);
    }
    case K_DOUBLE: {
        double number;
        if (value->token != T_INT && value->token != T_FLOAT) return 1;
        if (value->token == T_INT && value->length > 18) return 1;
        if (!parse_double(value->start, value->length, &number)) return 1;
        /* A JSON integer is a Python int, and float(-0) is 0.0: only "-0.0" and the like
           (JSON floats) are negative zero, as on the Python path. */
        if (value->token == T_INT && number == 0.0) number = 0.0;
        return put_double(out, number);
    }
    case K_BOOLEAN:
        if (value->token != T_TRUE && value->token != T_FALSE) return 1;
        return put_boolean(out, value->token == T_TRUE);
    case K_TIMESTAMPTZ: {
        int64_t micros;
        if (value->token != T_STR || (value->flags & F_ESCAPE)) return 1;
        if (!parse_timestamp(value->start + 1, value->length - 2, &micros)) return 1;
        return put_micros(out, micros);
    }
    case K_DATE: {
        int year, month, day;
        if (value->token != T_STR || (value->flags & F_ESCAPE) || value->length != 12) return 1;
        if (!parse_date_at(value->start + 1, &year, &month, &day)) return 1;
        return put_date(out, year, month, day);
    }
    case K_JSONB:
    case K_RAW: {
        /* The server's text as jsonb: equal to the Python path's re-encoding except for number
           spellings, so a column (not the raw record) takes no fractions, exponents or
           integers past int64 inside. */
        if (value->flags & F_NUL) return 1;
        if (kind == K_JSONB) {
            if (value->token == T_FLOAT) return 1;
            if (value->token == T_INT && value->length > 18 + (value->start[0] == '-')) return 1;
            if (value->flags & (F_FLOAT | F_LONGINT)) return 1;
        }
        if (value->length >= INT32_MAX) return 1;
        if (reserve(out, 5 + (size_t)value->length) < 0) return -1;
        put_u32(out, (uint32_t)value->length + 1);
        out->data[out->size++] = 1;
        memcpy(out->data + out->size, value->start, (size_t)value->length);
        out->size += (size_t)value->length;
        return 0;
    }
    default:
        return 1;
    }
}

/* A key or cursor value as the Python object the Python path would have; NULL + no error =
   refuse. kind: K_CURSOR for plain JSON, else the key column's kind (bigint/integer/text). */
static PyObject *value_object(int kind, const span *value) {
    if (value->token == T_MISSING || value->token == T_NULL) {
        if (kind == K_CURSOR) return Py_NewRef(Py_None);
        return NULL;
    }
    if (value->token == T_STR && (kind == K_CURSOR || kind == K_TEXT)) {
        if (value->flags & F_NUL) return NULL;
        if (!(value->flags & F_ESCAPE)) {
            return PyUnicode_DecodeUTF8(value->start + 1, value->length - 2, "strict");
        }
        char *text = PyMem_Malloc((size_t)value->length);
        if (text == NULL) return PyErr_NoMemory();
        Py_ssize_t length = unescape(value->start, value->length, text);
        PyObject *result = PyUnicode_DecodeUTF8(text, length, "strict");
        PyMem_Free(text);
        return result;
    }
    if (value->token == T_INT && (kind == K_CURSOR || kind == K_BIGINT || kind == K_INTEGER)) {
        int64_t number;
        if (!parse_int64(value->start, value->length, &number)) return NULL;
        if (kind == K_INTEGER && (number < INT32_MIN || number > INT32_MAX)) return NULL;
        return PyLong_FromLongLong(number);
    }
    if (value->token == T_FLOAT && kind == K_CURSOR) {
        double number;
        if (!parse_double(value->start, value->length, &number)) return NULL;
        return PyFloat_FromDouble(number);
    }
    return NULL;
}

typedef struct {
    paths tree;
    int columns;        /* written columns (the raw record included) */
    int *column_slot;   /* per written column: its slot, or -1 for the raw record */
    unsigned char *column_kind;
    unsigned char *column_required;
    int key_count;
    int *key_columns;   /* written column indexes of the primary key */
    int cursor_slot;    /* or -1 */
} record_spec;

static void free_spec(record_spec *spec) {
    PyMem_Free(spec->tree.nodes);
    PyMem_Free(spec->tree.entries);
    PyMem_Free(spec->tree.next_slot);
    PyMem_Free(spec->tree.subtree_slots);
    PyMem_Free(spec->tree.subtree_begin);
    PyMem_Free(spec->tree.subtree_end);
    PyMem_Free(spec->tree.slots);
    PyMem_Free(spec->column_slot);
    PyMem_Free(spec->column_kind);
    PyMem_Free(spec->column_required);
    PyMem_Free(spec->key_columns);
}

/* Find or add the entry `key` under node_index; returns the entry index, or -1 (error set).
   Entries of one node are contiguous: nodes are laid out breadth-first below. */
typedef struct {
    PyObject *path;  /* tuple of str */
    int slot;
} path_slot;

static int build_tree(record_spec *spec, path_slot *items, int count) {
    /* Every (node, key) pair becomes an entry; built level by level so a node's entries are
       contiguous. Bounded by the total number of path steps. */
    int steps = 0;
    for (int i = 0; i < count; i++) steps += (int)PyTuple_GET_SIZE(items[i].path);
    paths *tree = &spec->tree;
    tree->nodes = PyMem_Calloc((size_t)steps + 1, sizeof(node));
    tree->entries = PyMem_Calloc((size_t)steps + 1, sizeof(entry));
    tree->next_slot = PyMem_Malloc(sizeof(int) * ((size_t)tree->slot_count + 1));
    tree->subtree_slots = PyMem_Malloc(sizeof(int) * ((size_t)count * (steps + 1) + 1));
    tree->subtree_begin = PyMem_Calloc((size_t)steps + 1, sizeof(int));
    tree->subtree_end = PyMem_Calloc((size_t)steps + 1, sizeof(int));
    /* per path: the node it has reached at the current level */
    int *at_node = PyMem_Calloc((size_t)count + 1, sizeof(int));
    if (!tree->nodes || !tree->entries || !tree->next_slot || !tree->subtree_slots ||
        !tree->subtree_begin || !tree->subtree_end || !at_node) {
        PyMem_Free(at_node);
        PyErr_NoMemory();
        return -1;
    }
    for (int slot = 0; slot < tree->slot_count; slot++) tree->next_slot[slot] = -1;
    tree->node_count = 1;
    tree->entry_count = 0;
    int max_depth = 0;
    for (int i = 0; i < count; i++) {
        int length = (int)PyTuple_GET_SIZE(items[i].path);
        if (length > max_depth) max_depth = length;
    }
    /* level by level: nodes created at level d get their entries laid out at level d+1 */
    for (int level = 0; level < max_depth; level++) {
        for (int node_index = 0; node_index < tree->node_count; node_index++) {
            int first = tree->entry_count;
            int added = 0;
            for (int i = 0; i < count; i++) {
                Py_ssize_t length = PyTuple_GET_SIZE(items[i].path);
                if (length <= level || at_node[i] != node_index) continue;
                Py_ssize_t key_length;
                const char *key =
                    PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(items[i].path, level), &key_length);
                if (key == NULL) {
                    PyMem_Free(at_node);
                    return -1;
                }
                int found = -1;
                for (int e = first; e < first + added; e++) {
                    if (tree->entries[e].key_length == key_length &&
                        memcmp(tree->entries[e].key, key, (size_t)key_length) == 0) {
                        found = e;
                        break;
                    }
                }
                if (found < 0) {
                    found = first + added++;
                    tree->entries[found].key = key;
                    tree->entries[found].key_length = key_length;
                    tree->entries[found].child = -1;
                    tree->entries[found].first_slot = -1;
                    tree->entry_count++;
                }
                entry *e = &tree->entries[found];
                if (length == level + 1) {
                    tree->next_slot[items[i].slot] = e->first_slot;
                    e->first_slot = items[i].slot;
                    at_node[i] = -1;
                } else {
                    if (e->child < 0) e->child = tree->node_count++;
                    at_node[i] = e->child + 1000000; /* reached next level, mark */
                }
            }
            if (added) {
                tree->nodes[node_index].first_entry = first;
                tree->nodes[node_index].entries = added;
            }
        }
        for (int i = 0; i < count; i++) {
            if (at_node[i] >= 1000000) at_node[i] -= 1000000;
        }
    }
    PyMem_Free(at_node);
    /* the slots under each node, for the reset when a duplicate key replaces an object */
    int used = 0;
    for (int node_index = 0; node_index < tree->node_count; node_index++) {
        tree->subtree_begin[node_index] = used;
        for (int i = 0; i < count; i++) {
            /* walk the path from the root; the slot is under node_index if the walk passes */
            int current = 0;
            Py_ssize_t length = PyTuple_GET_SIZE(items[i].path);
            int under = node_index == 0;
            for (Py_ssize_t level = 0; level < length && !under; level++) {
                Py_ssize_t key_length;
                const char *key =
                    PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(items[i].path, level), &key_length);
                const node *n = &tree->nodes[current];
                int next = -1;
                for (int e = n->first_entry; e < n->first_entry + n->entries; e++) {
                    if (tree->entries[e].key_length == key_length &&
                        memcmp(tree->entries[e].key, key, (size_t)key_length) == 0) {
                        next = tree->entries[e].child;
                        break;
                    }
                }
                if (next < 0) break;
                current = next;
                if (current == node_index && level + 1 < length) under = 1;
            }
            if (under) tree->subtree_slots[used++] = items[i].slot;
        }
        tree->subtree_end[node_index] = used;
    }
    return 0;
}

/* spec: (columns, key_columns, cursor_path) where columns is a tuple of (path, kind, required)
   with path a tuple of str or None for the raw record, key_columns a tuple of column indexes,
   cursor_path a tuple of str or None. */
static int read_spec(PyObject *spec_arg, record_spec *spec) {
    memset(spec, 0, sizeof *spec);
    spec->cursor_slot = -1;
    PyObject *columns, *keys, *cursor;
    if (!PyArg_ParseTuple(spec_arg, "O!O!O:spec", &PyTuple_Type, &columns, &PyTuple_Type, &keys,
                          &cursor))
        return -1;
    int count = (int)PyTuple_GET_SIZE(columns);
    if (count > 1600) {
        PyErr_SetString(PyExc_ValueError, "more than 1600 columns");
        return -1;
    }
    spec->columns = count;
    spec->column_slot = PyMem_Calloc((size_t)count + 1, sizeof(int));
    spec->column_kind = PyMem_Calloc((size_t)count + 1, 1);
    spec->column_required = PyMem_Calloc((size_t)count + 1, 1);
    path_slot *items = PyMem_Calloc((size_t)count + 2, sizeof(path_slot));
    if (!spec->column_slot || !spec->column_kind || !spec->column_required || !items) {
        PyMem_Free(items);
        PyErr_NoMemory();
        return -1;
    }
    int item_count = 0;
    for (int i = 0; i < count; i++) {
        PyObject *path;
        int kind, required;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(columns, i), "Oip:column", &path, &kind,
                              &required)) {
            PyMem_Free(items);
            return -1;
        }
        if (kind < 0 || (kind >= K_COUNT && kind != K_RAW)) {
            PyErr_Format(PyExc_ValueError, "unknown column kind %d", kind);
            PyMem_Free(items);
            return -1;
        }
        spec->column_kind[i] = (unsigned char)kind;
        spec->column_required[i] = (unsigned char)required;
        if (path == Py_None) {
            spec->column_slot[i] = -1;
            continue;
        }
        if (!PyTuple_Check(path) || PyTuple_GET_SIZE(path) < 1) {
            PyErr_SetString(PyExc_ValueError, "a column path must be a non-empty tuple");
            PyMem_Free(items);
            return -1;
        }
        spec->column_slot[i] = item_count;
        items[item_count].path = path;
        items[item_count].slot = item_count;
        item_count++;
    }
    if (cursor != Py_None) {
        if (!PyTuple_Check(cursor) || PyTuple_GET_SIZE(cursor) < 1) {
            PyErr_SetString(PyExc_ValueError, "the cursor path must be a non-empty tuple");
            PyMem_Free(items);
            return -1;
        }
        spec->cursor_slot = item_count;
        items[item_count].path = cursor;
        items[item_count].slot = item_count;
        item_count++;
    }
    spec->key_count = (int)PyTuple_GET_SIZE(keys);
    spec->key_columns = PyMem_Calloc((size_t)spec->key_count + 1, sizeof(int));
    if (spec->key_columns == NULL) {
        PyMem_Free(items);
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < spec->key_count; i++) {
        long index = PyLong_AsLong(PyTuple_GET_ITEM(keys, i));
        if (index < 0 || index >= count || spec->column_slot[index] < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad key column");
            PyMem_Free(items);
            return -1;
        }
        spec->key_columns[i] = (int)index;
    }
    spec->tree.slot_count = item_count;
    spec->tree.slots = PyMem_Calloc((size_t)item_count + 1, sizeof(span));
    if (spec->tree.slots == NULL) {
        PyMem_Free(items);
        PyErr_NoMemory();
        return -1;
    }
    int status = build_tree(spec, items, item_count);
    PyMem_Free(items);
    return status;
}

/* ---- validate: is a page JSON that orjson.loads accepts? ------------------------------- */

/* orjson's nesting limit: 1024 arrays or objects deep parse, 1025 do not. */
#define ORJSON_MAX_DEPTH 1024

enum { V_OK = 0, V_MALFORMED, V_INFINITE, V_DEEP };

/* A number token at p as orjson reads it: 0 ok (end in *after), else why not. Integers past
   64 bits and every fraction or exponent are doubles to orjson, refused when infinite. */
static int validate_number(const char *p, const char *end, const char **after) {
    const char *start = p;
    if (p < end && *p == '-') p++;
    if (p >= end) return V_MALFORMED;
    Py_ssize_t whole = 0; /* digits before the point */
    if (*p == '0') {
        p++;
        whole = 0;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
        whole = (p - start) - (*start == '-');
    } else {
        return V_MALFORMED;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return V_MALFORMED;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    long exponent = 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        int negative = 0;
        if (p < end && (*p == '+' || *p == '-')) negative = *p++ == '-';
        if (p >= end || *p < '0' || *p > '9') return V_MALFORMED;
        while (p < end && *p >= '0' && *p <= '9') {
            if (exponent < 100000) exponent = exponent * 10 + (*p - '0');
            p++;
        }
        if (negative) exponent = -exponent;
    }
    *after = p;
    /* Below 10^308 whatever the digits: finite. Only a larger magnitude needs strtod. */
    if (whole + exponent < 308) return V_OK;
    size_t length = (size_t)(p - start);
    char *text = PyMem_RawMalloc(length + 1);
    if (text == NULL) return V_MALFORMED;
    memcpy(text, start, length);
    text[length] = '\0';
    double number = strtod_l(text, NULL, C_LOCALE);
    PyMem_RawFree(text);
    return isfinite(number) ? V_OK : V_INFINITE;
}

static int validate_value(const char *p, const char *end, int depth, const char **after) {
    if (p >= end) return V_MALFORMED;
    int flags = 0;
    switch (*p) {
    case '"':
        *after = parse_string(p, end, &flags);
        return *after != NULL ? V_OK : V_MALFORMED;
    case 't':
        *after = p + 4;
        return literal(p, end, "true", 4) ? V_OK : V_MALFORMED;
    case 'f':
        *after = p + 5;
        return literal(p, end, "false", 5) ? V_OK : V_MALFORMED;
    case 'n':
        *after = p + 4;
        return literal(p, end, "null", 4) ? V_OK : V_MALFORMED;
    case '{':
    case '[':
        break;
    default:
        return validate_number(p, end, after);
    }
    if (depth >= ORJSON_MAX_DEPTH) return V_DEEP;
    char close = *p == '{' ? '}' : ']';
    p = skip_ws(p + 1, end);
    if (p < end && *p == close) {
        *after = p + 1;
        return V_OK;
    }
    for (;;) {
        if (close == '}') {
            if (p >= end || *p != '"') return V_MALFORMED;
            p = parse_string(p, end, &flags);
            if (p == NULL) return V_MALFORMED;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return V_MALFORMED;
            p = skip_ws(p + 1, end);
        }
        int status = validate_value(p, end, depth + 1, &p);
        if (status != V_OK) return status;
        p = skip_ws(p, end);
        if (p >= end) return V_MALFORMED;
        if (*p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (*p != close) return V_MALFORMED;
        *after = p + 1;
        return V_OK;
    }
}

PyDoc_STRVAR(validate_doc,
"validate(body) -> str | None\n\n"
"None when ``orjson.loads(body)`` would accept the bytes, else why not (malformed, a number\n"
"that is infinite as a double, or nested deeper than orjson's 1024 levels). For parsers that\n"
"skip what they do not read (msgspec), so that every parser refuses the same pages.");

static PyObject *validate(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    const char *p = view.buf, *end = p + view.len, *after = NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = validate_value(skip_ws(p, end), end, 0, &after);
    if (status == V_OK && skip_ws(after, end) != end) status = V_MALFORMED;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    switch (status) {
    case V_OK:
        Py_RETURN_NONE;
    case V_INFINITE:
        return PyUnicode_FromString("a number is infinity when parsed as double");
    case V_DEEP:
        return PyUnicode_FromString("nested deeper than 1024 levels");
    default:
        return PyUnicode_FromString("not valid JSON (or not valid UTF-8)");
    }
}

PyDoc_STRVAR(encode_records_doc,
"encode_records(records, spec) -> (bytes, keys, cursors) | None\n\n"
"One binary COPY stream of ``records`` (each a JSON object's text, e.g. msgspec.Raw), with\n"
"the primary key values (a list, tuples for composite keys, or None without a key) and the\n"
"cursor values (a list or None); None when any record needs the Python path.");

/* One record into out; its key and cursor spans into kept. 0 ok, 1 refuse, -1 no memory.
   Touches no Python object: runs without the GIL. */
static int encode_one(record_spec *spec, buffer *out, const char *start, const char *end,
                      span *kept) {
    start = skip_ws(start, end);
    for (int slot = 0; slot < spec->tree.slot_count; slot++)
        spec->tree.slots[slot].token = T_MISSING;
    int flags = 0;
    const char *after = NULL;
    int status = read_object(&spec->tree, 0, start, end, 0, &flags, &after);
    if (status == 0 && skip_ws(after, end) != end) status = 1;
    if (status == 0 && reserve(out, 2) < 0) status = -1;
    if (status == 0) put_u16(out, (uint16_t)spec->columns);
    for (int column = 0; column < spec->columns && status == 0; column++) {
        int slot = spec->column_slot[column];
        if (slot < 0) {
            span whole = {start, after - start, T_OBJ, flags};
            status = put_json_value(out, K_RAW, 0, &whole);
        } else {
            status = put_json_value(out, spec->column_kind[column], spec->column_required[column],
                                    &spec->tree.slots[slot]);
        }
    }
    if (status == 0) {
        for (int i = 0; i < spec->key_count; i++)
            *kept++ = spec->tree.slots[spec->column_slot[spec->key_columns[i]]];
        if (spec->cursor_slot >= 0) *kept = spec->tree.slots[spec->cursor_slot];
    }
    return status;
}

/* The key (or, with several key columns, the tuple) a record's kept spans hold; NULL without
   an error set: refuse. */
static PyObject *key_object(const record_spec *spec, const span *kept) {
    if (spec->key_count == 1)
        return value_object(spec->column_kind[spec->key_columns[0]], kept);
    PyObject *key = PyTuple_New(spec->key_count);
    for (int i = 0; key != NULL && i < spec->key_count; i++) {
        PyObject *part = value_object(spec->column_kind[spec->key_columns[i]], &kept[i]);
        if (part == NULL) {
            Py_CLEAR(key);
            break;
        }
        PyTuple_SET_ITEM(key, i, part);
    }
    return key;
}

/* Three phases, so that the parse, the bulk of the work, runs without the GIL (a caller in
   another thread then truly runs beside the event loop): take the records' buffers; parse and
   write every record into plain memory, keeping the key and cursor spans; build the Python
   objects (keys, cursors, the bytes). */
static PyObject *encode_records(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *records_arg, *spec_arg;
    if (!PyArg_ParseTuple(args, "OO!:encode_records", &records_arg, &PyTuple_Type, &spec_arg))
        return NULL;
    record_spec spec;
    if (read_spec(spec_arg, &spec) < 0) {
        free_spec(&spec);
        return NULL;
    }
    /* Our own tuple: from Python 3.12 a buffer export (__buffer__) can run Python code. */
    PyObject *records = PySequence_Tuple(records_arg);
    if (records == NULL) {
        free_spec(&spec);
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(records);
    PyObject **items = PySequence_Fast_ITEMS(records);
    int per_record = spec.key_count + (spec.cursor_slot >= 0);
    Py_buffer *views = PyMem_Calloc((size_t)count + 1, sizeof(Py_buffer));
    span *kept = PyMem_Calloc((size_t)count * (size_t)per_record + 1, sizeof(span));
    Py_ssize_t taken = 0;
    buffer out = {NULL, NULL, 0, 0, 1};
    PyObject *keys = NULL, *cursors = NULL, *result = NULL;
    int status = 0;
    if (views == NULL || kept == NULL) {
        PyErr_NoMemory();
        status = -1;
        goto done;
    }
    for (; taken < count; taken++) {
        if (PyObject_GetBuffer(items[taken], &views[taken], PyBUF_SIMPLE) < 0) {
            status = -1;
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (reserve(&out, sizeof SIGNATURE + 8) < 0) {
        status = -1;
    } else {
        memcpy(out.data, SIGNATURE, sizeof SIGNATURE);
        out.size = sizeof SIGNATURE;
        put_u32(&out, 0);
        put_u32(&out, 0);
    }
    size_t input = 0; /* the records' bytes: what the stream's size mostly follows */
    for (Py_ssize_t index = 0; index < count; index++) input += (size_t)views[index].len;
    for (Py_ssize_t index = 0; index < count && status == 0; index++) {
        const char *start = views[index].buf;
        status = encode_one(&spec, &out, start, start + views[index].len,
                            kept + index * per_record);
        if (status == 0 && index == 0 && count > 2) {
            /* The rest of the batch at about the first record's size, in one allocation, but
               never more than about the input's size: a large first record must not make
               the batch reserve count times its size. Past that, the buffer doubles. */
            size_t first = out.size - (sizeof SIGNATURE + 8);
            size_t guess = (first + first / 4 + 16) * (size_t)(count - 1);
            size_t cap = input + input / 4 + 16 * (size_t)count;
            if (reserve(&out, guess < cap ? guess : cap) < 0) status = -1;
        }
    }
    if (status == 0) {
        if (reserve(&out, 2) < 0) {
            status = -1;
        } else {
            put_u16(&out, UINT16_C(0xFFFF));
        }
    }
    Py_END_ALLOW_THREADS
    if (status < 0) {
        /* Out of memory for the stream (a huge batch, or a machine short of memory): decline,
           so the batch takes the Python path instead of failing the run. */
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (status == 0 && spec.key_count) {
        keys = PyList_New(count);
        for (Py_ssize_t index = 0; keys != NULL && index < count && status == 0; index++) {
            PyObject *key = key_object(&spec, kept + index * per_record);
            if (key == NULL) {
                status = PyErr_Occurred() ? -1 : 1;
            } else {
                PyList_SET_ITEM(keys, index, key);
            }
        }
        if (keys == NULL) status = -1;
    }
    if (status == 0 && spec.cursor_slot >= 0) {
        cursors = PyList_New(count);
        for (Py_ssize_t index = 0; cursors != NULL && index < count && status == 0; index++) {
            PyObject *cursor =
                value_object(K_CURSOR, &kept[index * per_record + spec.key_count]);
            if (cursor == NULL) {
                status = PyErr_Occurred() ? -1 : 1;
            } else {
                PyList_SET_ITEM(cursors, index, cursor);
            }
        }
        if (cursors == NULL) status = -1;
    }
    if (status == 0) {
        PyObject *data = PyBytes_FromStringAndSize(out.data, (Py_ssize_t)out.size);
        if (data != NULL) {
            result = Py_BuildValue("(NOO)", data, keys ? keys : Py_None,
                                   cursors ? cursors : Py_None);
        }
    } else if (status == 1) {
        result = Py_NewRef(Py_None);
    }
done:
    for (Py_ssize_t index = 0; index < taken; index++) PyBuffer_Release(&views[index]);
    PyMem_Free(views);
    PyMem_Free(kept);
    PyMem_RawFree(out.data);
    Py_DECREF(records);
    free_spec(&spec);
    Py_XDECREF(keys);
    Py_XDECREF(cursors);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {"encode_records", encode_records, METH_VARARGS, encode_records_doc},
    {"validate", validate, METH_O, validate_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module) {
    init_plain();
    if (C_LOCALE == (locale_t)0) {
        C_LOCALE = newlocale(LC_ALL_MASK, "C", (locale_t)0);
        if (C_LOCALE == (locale_t)0) {
            PyErr_SetString(PyExc_OSError, "newlocale(\"C\") failed");
            return -1;
        }
    }
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) {
        return -1;
    }
    static const char *names[K_COUNT] = {"text", "bigint", "integer", "double",
                                         "boolean", "timestamptz", "date", "jsonb"};
    PyObject *kinds = PyDict_New();
    if (kinds == NULL) {
        return -1;
    }
    for (int kind = 0; kind < K_COUNT; kind++) {
        PyObject *code = PyLong_FromLong(kind);
        if (code == NULL || PyDict_SetItemString(kinds, names[kind], code) < 0) {
            Py_XDECREF(code);
            Py_DECREF(kinds);
            return -1;
        }
        Py_DECREF(code);
        if (ELEMENT_OID[kind] != 0) {
            PyObject *array = PyLong_FromLong(K_ARRAY | kind);
            PyObject *name = PyUnicode_FromFormat("%s[]", names[kind]);
            if (array == NULL || name == NULL || PyDict_SetItem(kinds, name, array) < 0) {
                Py_XDECREF(array);
                Py_XDECREF(name);
                Py_DECREF(kinds);
                return -1;
            }
            Py_DECREF(array);
            Py_DECREF(name);
        }
    }
    if (PyModule_AddObject(module, "KIND", kinds) < 0) {
        Py_DECREF(kinds);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ingest._copyenc",
    .m_doc = "Row tuples to a PostgreSQL binary COPY stream (see ingest/copyenc.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC PyInit__copyenc(void) { return PyModuleDef_Init(&module_def); }
