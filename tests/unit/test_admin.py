"""The admin token: where it is read from, what is refused, and how a header is checked."""

from __future__ import annotations

import hmac

import pytest

from app.errors import ConfigError
from app.serving import auth as admin
from app.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, check_bearer, load_admin_token

TOKEN = "s3cret-admin-token-0123456789"
OTHER = "another-long-admin-token-987654"


# ----------------------------------------------------------------------------- load_admin_token


def test_names_of_the_variables():
    assert TOKEN_ENV == "ROLLOUT_ADMIN_TOKEN"
    assert TOKEN_FILE_ENV == "ROLLOUT_ADMIN_TOKEN_FILE"


def test_no_token_configured_is_none():
    assert load_admin_token({}) is None


def test_token_from_the_variable_is_stripped():
    assert load_admin_token({TOKEN_ENV: f"  {TOKEN}\n"}) == TOKEN


def test_token_from_the_file_is_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert load_admin_token({TOKEN_FILE_ENV: str(path)}) == TOKEN


def test_the_variable_wins_over_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(OTHER)
    assert load_admin_token({TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: str(path)}) == TOKEN


def test_the_variable_wins_even_over_an_unreadable_file(tmp_path):
    missing = tmp_path / "missing"
    assert load_admin_token({TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: str(missing)}) == TOKEN


def test_a_blank_variable_falls_back_to_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    assert load_admin_token({TOKEN_ENV: "  ", TOKEN_FILE_ENV: str(path)}) == TOKEN


@pytest.mark.parametrize("value", ["", "   ", "\n"])
def test_empty_token_is_none(tmp_path, value):
    path = tmp_path / "token"
    path.write_text(value)
    assert load_admin_token({TOKEN_ENV: value}) is None
    assert load_admin_token({TOKEN_FILE_ENV: str(path)}) is None
    assert load_admin_token({TOKEN_FILE_ENV: ""}) is None


def test_unreadable_file_names_the_variable_and_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "token"
    with pytest.raises(ConfigError) as info:
        load_admin_token({TOKEN_FILE_ENV: str(missing)})
    message = str(info.value)
    assert TOKEN_FILE_ENV in message
    assert str(missing) in message


def test_a_directory_is_an_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=TOKEN_FILE_ENV):
        load_admin_token({TOKEN_FILE_ENV: str(tmp_path)})


def test_short_token_from_the_variable_is_refused_without_echoing_it():
    short = "x" * (admin.MIN_TOKEN_LENGTH - 1)
    with pytest.raises(ConfigError) as info:
        load_admin_token({TOKEN_ENV: short})
    message = str(info.value)
    assert TOKEN_ENV in message
    assert str(admin.MIN_TOKEN_LENGTH) in message
    assert short not in message


def test_short_token_from_the_file_names_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("tooshort\n")
    with pytest.raises(ConfigError) as info:
        load_admin_token({TOKEN_FILE_ENV: str(path)})
    assert TOKEN_FILE_ENV in str(info.value)
    assert str(path) in str(info.value)


def test_sixteen_characters_is_enough():
    assert admin.MIN_TOKEN_LENGTH == 16
    assert load_admin_token({TOKEN_ENV: "a" * 16}) == "a" * 16


def test_token_with_inner_whitespace_is_refused():
    with pytest.raises(ConfigError, match="whitespace"):
        load_admin_token({TOKEN_ENV: "abcdefghij klmnopqrst"})


def test_default_reads_os_environ(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    assert load_admin_token() == TOKEN
    monkeypatch.delenv(TOKEN_ENV)
    assert load_admin_token() is None


# ----------------------------------------------------------------------------- check_bearer


def test_good_token():
    assert check_bearer(f"Bearer {TOKEN}", TOKEN) is True


def test_wrong_token():
    assert check_bearer(f"Bearer {OTHER}", TOKEN) is False
    assert check_bearer(f"Bearer {TOKEN[:-1]}", TOKEN) is False  # a prefix is not the token
    assert check_bearer(f"Bearer {TOKEN}x", TOKEN) is False


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", TOKEN])
def test_missing_or_malformed(header):
    assert check_bearer(header, TOKEN) is False


@pytest.mark.parametrize("scheme", ["Basic", "Token", "Bearer:", "Bearerx"])
def test_wrong_scheme(scheme):
    assert check_bearer(f"{scheme} {TOKEN}", TOKEN) is False


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(scheme):
    assert check_bearer(f"{scheme} {TOKEN}", TOKEN) is True


@pytest.mark.parametrize("header", [f"  Bearer {TOKEN}  ", f"Bearer   {TOKEN}", f"Bearer\t{TOKEN}"])
def test_whitespace_around_and_between_is_tolerated(header):
    assert check_bearer(header, TOKEN) is True


def test_extra_parts_are_refused():
    assert check_bearer(f"Bearer {TOKEN} extra", TOKEN) is False
    assert check_bearer(f"Bearer {TOKEN[:10]} {TOKEN[10:]}", TOKEN) is False


def test_token_is_case_sensitive():
    assert check_bearer(f"Bearer {TOKEN.upper()}", TOKEN) is False


def test_empty_configured_token_never_matches():
    assert check_bearer("Bearer ", "") is False
    assert check_bearer("Bearer x", "") is False


def test_non_ascii_header_does_not_raise():
    assert check_bearer("Bearer tökén-with-ümlauts-0123", TOKEN) is False
    assert check_bearer("Bearer \udcff", TOKEN) is False  # a surrogate from odd header bytes


def test_compares_in_constant_time_on_bytes(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(admin.hmac, "compare_digest", spy)
    assert check_bearer(f"Bearer {TOKEN}", TOKEN) is True
    assert calls == [(TOKEN.encode(), TOKEN.encode())]
