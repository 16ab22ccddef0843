"""Password hashing (salted scrypt) and random tokens. Pure functions over the standard library."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# scrypt with N=2**14, r=8, p=1: about 50 ms and 16 MiB a guess (RFC 7914's interactive setting).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
MIN_PASSWORD_LENGTH = 12


class WeakPasswordError(ValueError):
    """The password is too short or otherwise refused; the message says why."""


def check_password_policy(password: str, username: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if username.lower() in password.lower():
        raise WeakPasswordError("a password must not contain the user name")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash``, all that verifying needs, in one string."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, base64.b64decode(expected))


# Verified when the user name is unknown, so that a wrong name costs as long as a wrong password.
DUMMY_HASH = hash_password("not a password of anyone", salt=b"\0" * 16)


def new_token() -> str:
    """A session or API token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database keeps of a token: its SHA-256, so a leaked table grants nothing."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
