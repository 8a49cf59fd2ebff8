"""One redaction helper for every secret: exact tokens, short and long secrets."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from lis_async.redact import SHOWN_CHARS, mask_url, redact, shown, strip_userinfo

LONG = "K3y-0123456789abcdef-SECRET-" + "x" * 200


TEMPLATES = [
    "GET https://lis.test/v2/stix21/search_host/x?api_key={enc}&p=1",
    "Authorization: Bearer {raw}",
    "error near {raw} here",
    "{raw}",
    "({raw})",
    "'{raw}',",
    "https://host/{enc}/path",
    "https://host/x?token={enc}",
]


@pytest.mark.parametrize("secret", ["k", "ab", "7", "s3cr3t", LONG, "a/b+c&d=e", "tök€n"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_secret_masked_wherever_it_stands_as_a_token(secret: str, template: str) -> None:
    text = template.format(raw=secret, enc=quote(secret, safe=""))
    assert redact(text, [secret]) == template.format(raw="***", enc="***")


@pytest.mark.parametrize("secret", ["k", "n", "o", "ow", "ser"])
def test_secret_inside_a_longer_word_is_left_alone(secret: str) -> None:
    # `lis-async check` with a one-letter key used to print "Name or service not ***nown".
    text = "Cannot connect to host api.example:443 ssl:default [Name or service not known]"
    assert redact(text, [secret]) == text


def test_api_key_parameter_masked_whatever_its_value() -> None:
    url = "https://lis.test/v2/stix21/search_host/x?api_key=anything&platform=opencti"
    assert redact(url) == "https://lis.test/v2/stix21/search_host/x?api_key=***&platform=opencti"
    assert redact("x?api_key%3Dabc&y=1") == "x?api_key%3D***&y=1"


def test_url_userinfo_masked() -> None:
    assert redact("http://u:pw@proxy:3128/") == "http://***@proxy:3128/"
    assert mask_url("amqps://user:pa55@rabbit:5671/") == "amqps://***@rabbit:5671/"
    assert mask_url("https://opencti:8080") == "https://opencti:8080"


def test_empty_secrets_and_plain_text_unchanged() -> None:
    assert redact("nothing to hide", ["", ""]) == "nothing to hide"
    assert redact("") == ""


# ------------------------------------------------------------------------------------------
# untrusted values in work messages and log lines (issue #20, findings 6 and 7)


def test_shown_masks_url_userinfo() -> None:
    url = "https://alice:S3cret@intranet.example/login?token=abc"
    assert shown(url) == "https://***@intranet.example/login?token=abc"
    assert strip_userinfo(url) == "https://intranet.example/login?token=abc"
    assert shown("alice:S3cret@intranet.example/x") == "***@intranet.example/x"
    assert strip_userinfo("//alice@h:8080/x") == "//h:8080/x"
    # an @ in the path, query or fragment is not userinfo
    for text in ("http://h/a@b", "http://h/?q=a@b#c@d", "bad.example.com"):
        assert shown(text) == text and strip_userinfo(text) == text


def test_shown_cuts_and_escapes() -> None:
    huge = "a" * 200_000
    text = shown(huge)
    assert text == "a" * SHOWN_CHARS + "... (200000 characters)"
    assert shown("x\r\nFAKE LOG LINE \x1b[31m") == "x\\r\\nFAKE LOG LINE \\x1b[31m"
    escaped = shown("\n" * 300)
    assert escaped.startswith("\\n" * 100) and escaped.endswith("... (300 characters)")
    # the userinfo is masked before the cut: a long password never shows in part
    long_secret = "https://alice:" + "S" * 500 + "@h/x"
    assert "S" not in shown(long_secret) and shown(long_secret) == "https://***@h/x"
