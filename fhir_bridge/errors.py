"""The one error tree of fhir-bridge.

Drawn the way httpx draws its own (``_exceptions.py``)::

    BridgeError                      issue type "exception"
    ├── InvalidInput                 "invalid"    our caller sent something wrong
    │   ├── InvalidIdentifier        "value"      a malformed INS/NIR or SYSTEM|VALUE
    │   ├── MalformedResource        "structure"  JSON/XML that is not the FHIR resource it claims to be
    │   └── TooLarge                 "too-long"   a body or attachment over its limit
    ├── NotFound                     "not-found"
    │   ├── Gone                     "deleted"    a deleted resource (R4 http.html#delete: 410)
    │   └── UnknownPatient           "not-found"  no Patient at the source for that identifier
    ├── AmbiguousPatient             "multiple-matches"
    ├── Conflict                     "conflict"
    │   └── PreconditionFailed       "conflict"   If-Match / If-None-Exist mismatch
    ├── BusinessRuleViolation        "business-rule"
    ├── Unsupported                  "not-supported"
    │   ├── UnsupportedMediaType     "not-supported" a body in a format we do not read (415)
    │   └── NotAcceptable            "not-supported" an answer asked in a format we do not write (406)
    ├── Forbidden                    "forbidden"
    │   └── InsufficientScope        "forbidden"  the token lacks the scope (403 insufficient_scope)
    ├── Unauthenticated              "login"      (the edges add their own: token refusals, OAuth errors)
    ├── SourceError                  "exception"  the national-record source misbehaved
    │   ├── NotAFhirSource           "invalid"    the URL does not answer FHIR at all
    │   ├── SourceProtocolError      "invalid"    a FHIR answer that breaks the protocol (page not a Bundle…)
    │   ├── PagingError              "too-costly" a next-link loop or more pages than allowed
    │   ├── SourceRejected           "exception"  a 4xx the source will not change its mind about
    │   ├── SourceUnavailable        "transient"  connection errors/timeouts/5xx after every retry
    │   └── AttachmentError          "exception"  one attachment unusable (size, hash, type): left out of the case
    ├── BlobUnreadable               "exception"  our stored bytes fail decryption/authentication (500)
    ├── AuditUnavailable             "transient"  the audit log can not store an event: the exchange is refused
    ├── AuditIntegrityError          "exception"  the stored audit chain does not verify (export, purge refused)
    └── DeliveryFailed               "transient"  a recipient did not take an opinion's notification (retried)

The adapters add a few leaves of their own where only they can tell (``SigningKeyError``,
``EmbeddedRedisError`` under BridgeError; ``OAuthError``, ``InvalidToken``, ``TokenRequestFailed``,
``MissingToken`` under Unauthenticated); ``tests/unit/test_errors.py`` keeps this drawing equal to the classes.

Each error knows its FHIR issue type (R4 ValueSet issue-type) but never an HTTP status or an exit code:
the API edge and the CLI map classes to those in one place each. Messages must never contain patient
identifiers, names or document content: they end up in logs and in OperationOutcomes.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BridgeError(Exception):
    """Base of every error fhir-bridge raises on purpose."""

    issue_type: ClassVar[str] = "exception"
    #: a stable machine code for clients and tests (OperationOutcome.issue.details.coding.code)
    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, expression: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.expression = expression or []

    def __str__(self) -> str:
        return self.message


class InvalidInput(BridgeError):
    issue_type = "invalid"
    code = "invalid-input"


class InvalidIdentifier(InvalidInput):
    issue_type = "value"
    code = "invalid-identifier"


class MalformedResource(InvalidInput):
    issue_type = "structure"
    code = "malformed-resource"


class TooLarge(InvalidInput):
    issue_type = "too-long"
    code = "too-large"


class NotFound(BridgeError):
    issue_type = "not-found"
    code = "not-found"


class Gone(NotFound):
    issue_type = "deleted"
    code = "gone"


class UnknownPatient(NotFound):
    code = "unknown-patient"


class AmbiguousPatient(BridgeError):
    issue_type = "multiple-matches"
    code = "ambiguous-patient"


class Conflict(BridgeError):
    issue_type = "conflict"
    code = "conflict"


class PreconditionFailed(Conflict):
    code = "precondition-failed"


class BusinessRuleViolation(BridgeError):
    issue_type = "business-rule"
    code = "business-rule"


class Unsupported(BridgeError):
    issue_type = "not-supported"
    code = "not-supported"


class UnsupportedMediaType(Unsupported):
    code = "unsupported-media-type"


class NotAcceptable(Unsupported):
    code = "not-acceptable"


class Forbidden(BridgeError):
    issue_type = "forbidden"
    code = "forbidden"


class InsufficientScope(Forbidden):
    """The access token lacks the scope the interaction needs (RFC 6750 §3.1 ``insufficient_scope``)."""

    code = "insufficient-scope"


class Unauthenticated(BridgeError):
    issue_type = "login"
    code = "unauthenticated"


class SourceError(BridgeError):
    """The national-record source did not give us what the protocol promises.

    ``status`` and ``outcome`` keep what the source said (its HTTP status and OperationOutcome, as parsed
    JSON) so callers can show it; ``url`` is the request URL with its query removed (queries carry
    patient identifiers).
    """

    issue_type = "exception"
    code = "source-error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        outcome: dict[str, Any] | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome
        self.url = url


class NotAFhirSource(SourceError):
    issue_type = "invalid"
    code = "not-a-fhir-source"


class SourceProtocolError(SourceError):
    issue_type = "invalid"
    code = "source-protocol-error"


class PagingError(SourceError):
    issue_type = "too-costly"
    code = "paging-error"


class SourceRejected(SourceError):
    code = "source-rejected"


class SourceUnavailable(SourceError):
    issue_type = "transient"
    code = "source-unavailable"


class BlobUnreadable(BridgeError):
    """A stored blob cannot be turned back into its plaintext: damaged, cut, tampered with, or its key is gone.

    Our own storage failing, not the caller's mistake: the API answers 500 and the message names no content.
    """

    code = "blob-unreadable"


class AuditUnavailable(BridgeError):
    """The audit log could not store an event: the exchange must be refused (fail closed, no audit no exchange)."""

    issue_type = "transient"
    code = "audit-unavailable"


class AuditIntegrityError(BridgeError):
    """The stored chain does not verify, so the operation that relies on it (export, purge) is refused."""

    issue_type = "exception"
    code = "audit-chain-broken"


class DeliveryFailed(BridgeError):
    """A delivery (a webhook notification) was not acknowledged; the delivery job is retried with backoff."""

    issue_type = "transient"
    code = "delivery-failed"


class AttachmentError(SourceError):
    """One attachment could not be used; ``reason`` is the problems.json reason code."""

    code = "attachment-error"

    def __init__(self, message: str, *, reason: str, status: int | None = None, url: str | None = None):
        super().__init__(message, status=status, url=url)
        self.reason = reason
