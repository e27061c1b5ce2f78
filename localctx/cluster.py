"""Where a batch runs when it does not run in this process: N workers of a local Ray runtime, or an
existing Ray cluster. Validated here, before anything starts; Ray itself is imported only by
localctx.distributed, and only when one of these is given."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InputError

MAX_WORKERS = 4096
ADDRESS_ENV = "RAY_ADDRESS"


@dataclass(frozen=True)
class Cluster:
    """`workers`: worker processes (each loads the model once); `address`: an existing Ray cluster
    ("auto": $RAY_ADDRESS), None for a local runtime of `workers` workers started for the batch.
    `timeout`: seconds to wait for a cluster to answer before giving up with an error."""

    workers: int | None = None  # None on a cluster: one worker per `threads` of its CPUs
    address: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        w = self.workers
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= MAX_WORKERS):
            raise InputError(f"workers must be a number from 1 to {MAX_WORKERS}, not {w!r}.")
        if w is None and self.address is None:
            raise InputError("Give a number of workers, a Ray cluster's address, or both.")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise InputError(f"The Ray address is empty: give HOST:PORT, ray://HOST:PORT or auto (${ADDRESS_ENV}).")
        if not self.timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, not {self.timeout!r}.")

    @classmethod
    def of(cls, workers: int | None, address: str | None) -> Cluster | None:
        """None (run in this process) unless workers or an address is given."""
        return None if workers is None and address is None else cls(workers, address)

    @property
    def local(self) -> bool:
        return self.address is None

    def resolved_address(self) -> str:
        """The address to connect to: `auto` reads $RAY_ADDRESS, and its absence is an error."""
        if self.address is None:
            raise InputError("A local runtime has no address.")
        if self.address != "auto":
            return self.address.strip()
        found = os.environ.get(ADDRESS_ENV, "").strip()
        if not found:
            raise InputError(f"--ray auto reads ${ADDRESS_ENV}, which is not set: export it or give HOST:PORT.")
        return found
