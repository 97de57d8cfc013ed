"""What a root's identities are (the manifest's `identities`, shards.schema.identity_kind), and the
one refusal of what needs polyps on a root whose identities are tracker tracks.

A root converted from a tracker's output (`convert mot --tracks`) has one identity per track:
the same polyp leaving the view and coming back is two identities, and a false positive is one.
Training with the temporal samplers needs no identity and works; `--sampler multipos`,
retrieval, re-identification, counting and the probes score or group by polyp and would
measure the tracker, not the encoder: they refuse such a root (`TrackIdentitiesError`, bad
input, exit 2), naming what would enable them.
"""

from __future__ import annotations

from pathlib import Path

from polyp_ssl.shards.schema import identity_kind
from polyp_ssl.shards.tables import CatalogError, read_manifest

ENABLE = (
    "polyp identities would enable it: convert the sequences with their gt/gt.txt (`polyp-ssl convert "
    "mot RAW OUT` without --tracks), or bring the boxes as a table with an identity column "
    "(`polyp-ssl convert table`)"
)


class TrackIdentitiesError(CatalogError):
    """What needs polyp identities, asked of a root whose identities are tracks."""

    bad_input = True


def root_identity_kind(root: str | Path) -> str:
    """ "polyps" or "tracks" for an ingested root (CatalogError for a manifest whose field is
    neither)."""
    manifest = read_manifest(root)
    try:
        return identity_kind(manifest)
    except ValueError as exc:
        raise CatalogError(f"{Path(root) / 'catalog' / 'manifest.json'}: {exc}") from None


def track_refusal(root: str | Path, what: str) -> str:
    """The one line refusing `what` on a root whose identities are tracks: why, and what enables it."""
    return (
        f"{root}: {what} needs polyp identities, and this root's identities are tracker tracks "
        f"(catalog manifest 'identities': 'tracks'; one polyp may be several tracks); {ENABLE}"
    )


def require_polyp_identities(root: str | Path, what: str) -> None:
    """TrackIdentitiesError (`track_refusal`) when `root`'s identities are tracks; nothing otherwise."""
    if root_identity_kind(root) == "tracks":
        raise TrackIdentitiesError(track_refusal(root, what))
