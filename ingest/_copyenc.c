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

typedef struct {
    char *data;
    size_t size;
    size_t capacity;
} buffer;

static int reserve(buffer *out, size_t more) {
    if (out->size + more <= out->capacity) {
        return 0;
    }
    size_t capacity = out->capacity ? out->capacity : 65536;
    while (capacity < out->size + more) {
        if (capacity > ((size_t)PY_SSIZE_T_MAX) / 2) {
            PyErr_NoMemory();
            return -1;
        }
        capacity *= 2;
    }
    char *grown = PyMem_Realloc(out->data, capacity);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    out->data = grown;
    out->capacity = capacity;
    return 0;
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

/* One value; 0 = written, 1 = refuse (asyncpg decides), -1 = error set. */
static int put_value(buffer *out, int kind, PyObject *value) {
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
        if (kind == K_BIGINT) {
            if (reserve(out, 12) < 0) return -1;
            put_u32(out, 8);
            put_u64(out, (uint64_t)number);
        } else {
            if (number < INT32_MIN || number > INT32_MAX) return 1;
            if (reserve(out, 8) < 0) return -1;
            put_u32(out, 4);
            put_u32(out, (uint32_t)(int32_t)number);
        }
        return 0;
    }
    case K_DOUBLE: {
        if (!PyFloat_CheckExact(value)) return 1;
        double number = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &number, sizeof bits);
        if (reserve(out, 12) < 0) return -1;
        put_u32(out, 8);
        put_u64(out, bits);
        return 0;
    }
    case K_BOOLEAN: {
        if (value != Py_True && value != Py_False) return 1;
        if (reserve(out, 5) < 0) return -1;
        put_u32(out, 1);
        out->data[out->size++] = value == Py_True;
        return 0;
    }
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
        int64_t micros = seconds * 1000000 + PyDateTime_DATE_GET_MICROSECOND(value) - offset;
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
    case K_DATE: {
        if (!PyDate_CheckExact(value)) return 1;
        int year = PyDateTime_GET_YEAR(value);
        int month = PyDateTime_GET_MONTH(value);
        int day = PyDateTime_GET_DAY(value);
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
    default:
        return 1;
    }
}

static const char SIGNATURE[11] = {'P', 'G', 'C', 'O', 'P', 'Y', '\n', '\xff', '\r', '\n', '\0'};

PyDoc_STRVAR(encode_doc,
"encode(rows, kinds) -> bytes | None\n\n"
"One binary COPY stream (header, tuples, trailer) of ``rows``, each a tuple with one value per\n"
"entry of ``kinds`` (the KIND codes), or None when any value is not one this encoder takes\n"
"exactly as asyncpg would: the caller then lets asyncpg encode the rows.");

static PyObject *encode(PyObject *module, PyObject *args) {
    PyObject *rows_arg;
    PyObject *kinds_arg;
    if (!PyArg_ParseTuple(args, "OO!:encode", &rows_arg, &PyBytes_Type, &kinds_arg)) {
        return NULL;
    }
    Py_ssize_t columns = PyBytes_GET_SIZE(kinds_arg);
    const unsigned char *kinds = (const unsigned char *)PyBytes_AS_STRING(kinds_arg);
    if (columns > 1600) { /* PostgreSQL's own limit; the tuple header is 16 bits */
        PyErr_SetString(PyExc_ValueError, "more than 1600 columns");
        return NULL;
    }
    for (Py_ssize_t column = 0; column < columns; column++) {
        if (kinds[column] >= K_COUNT) {
            PyErr_Format(PyExc_ValueError, "unknown column kind %d", (int)kinds[column]);
            return NULL;
        }
    }
    PyObject *rows = PySequence_Fast(rows_arg, "rows must be a sequence");
    if (rows == NULL) {
        return NULL;
    }
    buffer out = {NULL, 0, 0};
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
        result = PyBytes_FromStringAndSize(out.data, (Py_ssize_t)out.size);
    } else if (status == 1) {
        result = Py_NewRef(Py_None);
    }
    PyMem_Free(out.data);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *module) {
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
