"""`python -m vrai_stream.auth`: static tokens for `VRAI_AUTH=token`, made or hashed.

`new-token USER` prints a new token and its `VRAI_AUTH_TOKENS` entry; `hash-token` hashes one.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Sequence

from vrai_stream.auth.config import hash_token, parse_token_table


def main(argv: Sequence[str] | None = None) -> int:
    """`new-token USER` makes a token and its entry; `hash-token [TOKEN]` hashes one."""
    parser = argparse.ArgumentParser(
        prog="python -m vrai_stream.auth", description="Static tokens for VRAI_AUTH=token."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    new = commands.add_parser("new-token", help="print a new random token and its entry")
    new.add_argument("user", help="the user id the token stands for")
    hashing = commands.add_parser("hash-token", help="print the sha256:<hex> of a token")
    hashing.add_argument(
        "value",
        metavar="TOKEN",
        nargs="?",
        default="-",
        help="the token; `-` or nothing reads it from stdin",
    )
    args = parser.parse_args(argv)
    if args.command == "new-token":
        token = secrets.token_urlsafe(32)
        entry = f"{args.user}:{hash_token(token)}"
        parse_token_table(entry)  # the same check the settings will make
        print(f"token (give it to {args.user}): {token}")
        print(f"VRAI_AUTH_TOKENS entry:        {entry}")
        return 0
    given: str = sys.stdin.readline().strip() if args.value == "-" else args.value
    if not given:
        parser.error("the token is empty")
    print(hash_token(given))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
