"""`keygen`: a random cluster key, written privately."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import click

from replicator.cli.app import (
    Problem,
    main,
)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing file.")
def keygen(path: str, force: bool) -> None:
    """Write a new random cluster passphrase to PATH (mode 0600).

    Every node of a cluster needs the same key: copy the file to each, then point their
    configs at it with auth = { secret_key_file = "PATH" }. Needs no running node.
    """
    target = Path(path).absolute()
    key = secrets.token_urlsafe(32) + "\n"
    if target.exists() and not force:
        raise Problem(
            f"{target} exists: pass --force to replace it (nodes still using the old key "
            "will refuse the ones using the new one)"
        )
    try:
        _write_private(target, key, replace=force)
    except FileExistsError:
        raise Problem(f"{target} exists: pass --force to replace it") from None
    except OSError as error:
        raise Problem(f"cannot write {target}: {error.strerror}") from None
    for line in (
        f"Wrote a new cluster key to {target} (mode 0600).",
        "Copy it to every node of the cluster, then reference it in each node's config:",
        "",
        "  replication {",
        f'    auth = {{ secret_key_file = "{target}" }}',
        "  }",
        "",
        "Rotating keys: keep the old file as previous_secret_key_file until every node has",
        "the new one.",
    ):
        click.echo(line)


def _write_private(target: Path, text: str, *, replace: bool) -> None:
    """Create with mode 0600 from the first byte (O_EXCL: never through a planted file);
    a replacement is written beside the target and renamed over it, so it is atomic too."""
    path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp") if replace else target
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as file:
            fd = -1
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(path, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
