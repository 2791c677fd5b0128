#!/usr/bin/env python3
"""Make an X25519 key pair for mpudp, or print the public key of a private one.

    python3 keygen.py                   # a new pair, as the original's keygen prints it
    python3 keygen.py --public PRIVATE  # the public key of a base64 private key

The crypto lives in mpudp.py so the daemon stays one self-contained file.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mpudp  # noqa: E402  (after the path fix, so keygen.py works from any directory)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="keygen.py", description="X25519 keys for mpudp.")
    parser.add_argument("--public", metavar="PRIVATE", help="print the public key of this base64 private key")
    args = parser.parse_args(argv)
    if args.public is not None:
        try:
            private = mpudp.decode_key(args.public)
        except mpudp.ProtocolError as exc:
            sys.stderr.write("keygen: the private key %s\n" % exc)
            return 2
        print(mpudp.encode_key(mpudp.public_key(private)))
        return 0
    private = mpudp.generate_private_key()
    print("Private Key (Base64): %s" % mpudp.encode_key(private))
    print("Public Key (Base64): %s" % mpudp.encode_key(mpudp.public_key(private)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
