"""Paginator details that servers get wrong: Link headers, numbers as strings, empty values."""

from __future__ import annotations

import pytest

from ingest.config import CursorPagination, OffsetPagination, PageNumberPagination
from ingest.errors import PaginationError
from ingest.http.messages import HttpResponse, PageRequest
from ingest.paginate import (
    CursorPaginator,
    OffsetPaginator,
    Page,
    PageNumberPaginator,
    parse_link_header,
)
from ingest.paths import lenient_bool, lenient_int


def page(request: PageRequest, document: object, records: list[object]) -> Page:
    return Page(request, HttpResponse(request.full_url(), 200, {}, b"", document), records)


def test_link_header_with_several_rels_and_links() -> None:
    header = (
        '<https://api.example.com/items?page=3>; rel="next", '
        '<https://api.example.com/items?page=1>; rel="first prev", '
        '</items?page=9>; rel=last; title="a, b"'
    )
    assert parse_link_header(header) == {
        "next": "https://api.example.com/items?page=3",
        "first": "https://api.example.com/items?page=1",
        "prev": "https://api.example.com/items?page=1",
        "last": "/items?page=9",
    }
    assert parse_link_header("") == {}
    assert parse_link_header("garbage") == {}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        ("5", 5),
        (" 12 ", 12),
        ("3.0", 3),
        (None, None),
        ("", None),
        ("x", None),
        (True, None),
    ],
)
def test_lenient_int(value: object, expected: int | None) -> None:
    assert lenient_int(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (False, False),
        ("false", False),
        ("0", False),
        (0, False),
        ("true", True),
        (None, None),
        ("", None),
    ],
)
def test_lenient_bool(value: object, expected: bool | None) -> None:
    assert lenient_bool(value) == expected


def test_page_number_total_as_string_and_total_pages() -> None:
    paginator = PageNumberPaginator(
        PageNumberPagination(style="page_number", total_path="total", total_pages_path="pages")
    )
    first = paginator.first_request(PageRequest("http://h/items"))
    assert first.param("page") == "1"
    second = paginator.next_request(page(first, {"total": "3", "pages": ""}, [1, 2]))
    assert second is not None and second.param("page") == "2"
    assert paginator.next_request(page(second, {"total": "3"}, [3])) is None


def test_page_number_has_more_absent_is_not_a_stop() -> None:
    paginator = PageNumberPaginator(
        PageNumberPagination(style="page_number", has_more_path="has_more")
    )
    first = paginator.first_request(PageRequest("http://h/items"))
    assert paginator.next_request(page(first, {}, [1])) is not None
    assert paginator.next_request(page(first, {"has_more": "false"}, [1])) is None


def test_offset_resumes_counting_from_snapshot() -> None:
    paginator = OffsetPaginator(OffsetPagination(style="offset", limit=10, total_path="count"))
    first = paginator.first_request(PageRequest("http://h/items"))
    second = paginator.next_request(page(first, {"count": 25}, list(range(10))))
    assert second is not None and second.param("offset") == "10"
    restored = OffsetPaginator(OffsetPagination(style="offset", limit=10, total_path="count"))
    restored.restore(paginator.snapshot())
    third = restored.next_request(page(second, {"count": 25}, list(range(10))))
    assert third is not None and third.param("offset") == "20"
    assert restored.next_request(page(third, {"count": 25}, list(range(5)))) is None


def test_cursor_has_more_true_without_cursor_is_an_error() -> None:
    paginator = CursorPaginator(
        CursorPagination(style="cursor", cursor_path="next", has_more_path="more")
    )
    first = paginator.first_request(PageRequest("http://h/items"))
    with pytest.raises(PaginationError, match="says there are more pages but next is empty"):
        paginator.next_request(page(first, {"more": True, "next": ""}, [1]))
    assert paginator.next_request(page(first, {"more": False, "next": "abc"}, [1])) is None
    following = paginator.next_request(page(first, {"next": 17}, [1]))
    assert following is not None and following.param("cursor") == "17"


def test_total_from_header_ignores_empty_header() -> None:
    config = PageNumberPagination(style="page_number", total_header="X-Total-Count")
    paginator = PageNumberPaginator(config)
    first = paginator.first_request(PageRequest("http://h/items"))

    def with_header(value: str) -> Page:
        response = HttpResponse("http://h/items", 200, {"x-total-count": value}, b"", [])
        return Page(first, response, [1, 2])

    assert paginator.next_request(with_header("")) is not None
    assert paginator.next_request(with_header("4")) is None
