"""Searches at the source, every page followed: the paging the source client's ITI-67, ITI-78 and ImagingStudy
searches share (FHIR R4 http.html#paging).

Its own module because paging is where a source can make us misbehave: every page is followed through
``Bundle.link[relation=next]`` whatever page size the source imposes, but a next link already seen, a next link
to another origin (it would receive our credentials), or more pages than ``source.max_pages`` is a
:class:`~fhir_bridge.errors.PagingError`/:class:`~fhir_bridge.errors.SourceProtocolError`, never an endless
loop. Which searches are asked (``patient`` and ``status`` for ITI-67, MHD ITI-67 §2:3.67.4.1.2) and how their
matches are read is :class:`~fhir_bridge.adapters.source_client.SourceClient`'s; the requests themselves go
through :class:`~fhir_bridge.adapters.source_http.SourceHttp`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from fhir_bridge.adapters.source_http import OpenExchange, SourceHttp, redact
from fhir_bridge.errors import NotAFhirSource, PagingError, SourceProtocolError, SourceRejected
from fhir_bridge.fhir.resources import Resource


async def search_pages(http: SourceHttp, resource_type: str, params: Mapping[str, str],
                       exchange: OpenExchange | None = None) -> AsyncIterator[Resource]:
    """Yield each searchset page, following ``Bundle.link[next]`` (FHIR R4 http.html#paging)."""
    url = f"{http.base_url}/{resource_type}"
    page_params: Mapping[str, str] | None = {"_count": str(http.settings.page_size), **params}
    seen: set[str] = set()
    pages = 0
    while True:
        try:
            page = await http.get_json(url, page_params, exchange)
        except SourceRejected as exc:
            if exc.status in (404, 405) and pages == 0:  # no such type-level search at this base
                raise NotAFhirSource(
                    f"{redact(url)} has no {resource_type} search (HTTP {exc.status}): not an MHD source base",
                    status=exc.status, outcome=exc.outcome, url=redact(url),
                ) from None
            raise
        pages += 1
        if page.get("resourceType") != "Bundle" or page.get("type") != "searchset":
            raise SourceProtocolError(
                f"a {resource_type} search answered a {page.get('resourceType')} "
                f"({page.get('type', 'no type')}) where a searchset Bundle was expected",
                url=redact(url),
            )
        yield page
        next_url = next(
            (link.get("url") for link in page.get("link", []) if link.get("relation") == "next"), None
        )
        if not next_url:
            return
        next_url = http.absolute(str(next_url))
        if not http.same_origin(next_url):
            raise SourceProtocolError("a next link points to another origin; not followed", url=redact(url))
        if next_url in seen or (page_params is None and next_url == url):
            raise PagingError(f"the {resource_type} search pages loop: a next link came back", url=redact(url))
        if pages >= http.settings.max_pages:
            raise PagingError(
                f"the {resource_type} search has more than {http.settings.max_pages} pages "
                "(source.max_pages)", url=redact(url),
            )
        seen.add(next_url)
        url, page_params = next_url, None


async def search_all(http: SourceHttp, resource_type: str, params: Mapping[str, str],
                     exchange: OpenExchange) -> tuple[list[Resource], list[Resource]]:
    """Every match and every ``include`` entry over all pages; OperationOutcome entries (``mode=outcome``) are
    the source's remarks, not results, and are left out."""
    matches: list[Resource] = []
    included: list[Resource] = []
    async for page in search_pages(http, resource_type, params, exchange):
        for entry in page.get("entry", []) or []:
            resource = entry.get("resource")
            if not isinstance(resource, dict):
                continue
            mode = (entry.get("search") or {}).get("mode", "match")
            if resource.get("resourceType") == "OperationOutcome" or mode == "outcome":
                continue
            (included if mode == "include" else matches).append(resource)
    return matches, included
