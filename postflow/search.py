"""Typed keys of Postflow's custom search attributes (names in postflow.constants)."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

__all__ = [
    "ATTEMPTS",
    "DELIVERY_STATE",
    "MAIL_FROM",
    "MESSAGE_ID",
    "NEXT_ATTEMPT_AT",
    "PRIORITY",
    "RECIPIENT_DOMAINS",
    "TRANSPORT",
    "all_keys",
]

MAIL_FROM = SearchAttributeKey.for_keyword("MailFrom")
RECIPIENT_DOMAINS = SearchAttributeKey.for_keyword_list("RecipientDomains")
TRANSPORT = SearchAttributeKey.for_keyword_list("Transport")
DELIVERY_STATE = SearchAttributeKey.for_keyword("DeliveryState")
ATTEMPTS = SearchAttributeKey.for_int("Attempts")
NEXT_ATTEMPT_AT = SearchAttributeKey.for_datetime("NextAttemptAt")
MESSAGE_ID = SearchAttributeKey.for_keyword("MessageId")
PRIORITY = SearchAttributeKey.for_bool("Priority")


def all_keys() -> list[SearchAttributeKey]:
    """Every custom attribute as a typed key (to register them on a dev server)."""
    from postflow.constants import SEARCH_ATTRIBUTES

    makers = {
        "Keyword": SearchAttributeKey.for_keyword,
        "KeywordList": SearchAttributeKey.for_keyword_list,
        "Int": SearchAttributeKey.for_int,
        "Datetime": SearchAttributeKey.for_datetime,
        "Bool": SearchAttributeKey.for_bool,
    }
    return [makers[kind](name) for name, kind in SEARCH_ATTRIBUTES.items()]
