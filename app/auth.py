"""Sign-in: when the app has a password (``CLIPDEX_APP_PASSWORD``; ``clipdex app`` requires one to serve
beyond this machine), a session sees only the sign-in form until it gives the password. Streamlit has no
authentication of its own: the check runs in ``main.py`` before any page, and again in every page's sidebar.
"""

from __future__ import annotations

import hashlib
import hmac

import streamlit as st

from clipdex.app.settings import AppSettings

SIGNED_IN = "clipdex_signed_in"  # session-state key: True once this session gave the password


def password_matches(given: str, *, expected: str) -> bool:
    """Whether ``given`` is the password, compared in constant time (digests, so the length is not timed)."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8")).digest()  # noqa: E731
    return bool(expected) and hmac.compare_digest(digest(given), digest(expected))


def signed_in(cfg: AppSettings) -> bool:
    """Whether this session may see the pages: the app has no password, or the session gave it."""
    return not cfg.password or st.session_state.get(SIGNED_IN) is True


def sign_in_form(cfg: AppSettings) -> None:
    """The only thing a session sees until it signs in."""
    st.title("clipdex")
    with st.form("sign_in"):
        given = st.text_input("Password", type="password", key="sign_in_password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return
    if not password_matches(given, expected=cfg.password):
        st.error("Wrong password.")
        return
    st.session_state[SIGNED_IN] = True
    st.rerun()
