"""The guest's memory inside a batch system's allocation: what Slurm gives the job, minus UML's own.

A Slurm job's memory (``sbatch --mem``, ``--mem-per-cpu``) is counted by its
cgroup, and that counts everything the UML process tree uses: the guest's
memory file (pages the guest touched, in $TMPDIR) and UML's own memory beyond
it (the kernel binary, page tables, the host processes of guest processes,
vde_plug).  A guest given the whole allocation would be killed from outside
by Slurm when it fills its memory; given the allocation minus a margin for
UML itself, it runs out inside and the guest's OOM killer reports it
(``oom_killed`` in the status record).  The margin was measured
(docs/submit.md): ``MARGIN_MIB`` plus ``MARGIN_PERCENT`` of the allocation.
Imported by apppot_host.start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from .uml_run import parse_size

log = logging.getLogger("apppot-start")

# Measured (docs/submit.md, bench/measure_margin.py): beyond the guest's memory the UML process tree peaked at
# 5-8 MiB with a 256 MiB-1 GiB guest, 10-13 MiB with 2 GiB (page tables), 31 MiB with 200 guest processes and
# the network; a limit 8 MiB above 2 GiB was too little.
MARGIN_MIB = 48
MARGIN_PERCENT = 2
MIN_GUEST_MIB = 64  # apppot-start's own minimum (uml_run.parse_size)


@dataclass(frozen=True, slots=True)
class Allocation:
    """The memory a batch system gives this job on this node, and where that was read."""

    mib: int
    source: str  # e.g. "SLURM_MEM_PER_NODE=2000"

    @property
    def margin_mib(self) -> int:
        return MARGIN_MIB + self.mib * MARGIN_PERCENT // 100

    @property
    def guest_mib(self) -> int:
        """The guest's memory that fits in the allocation with room for UML itself (at least MIN_GUEST_MIB)."""
        return max(MIN_GUEST_MIB, self.mib - self.margin_mib)


def _mib(value: str | None) -> int | None:
    """Slurm's memory variables are whole MiB; 0 (or anything else) means no limit we can use."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value) or None


def slurm_allocation(env: Mapping[str, str]) -> Allocation | None:
    """The job's memory on this node from Slurm's environment, or None outside a Slurm job (or without a limit).

    ``SLURM_MEM_PER_NODE`` (``--mem``) or ``SLURM_MEM_PER_CPU`` (``--mem-per-cpu``,
    or the cluster's DefMemPerCPU) times ``SLURM_CPUS_ON_NODE``.
    """
    per_node = _mib(env.get("SLURM_MEM_PER_NODE"))
    if per_node is not None:
        return Allocation(per_node, f"SLURM_MEM_PER_NODE={per_node}")
    per_cpu = _mib(env.get("SLURM_MEM_PER_CPU"))
    cpus = _mib(env.get("SLURM_CPUS_ON_NODE")) or 1
    if per_cpu is not None:
        return Allocation(per_cpu * cpus, f"SLURM_MEM_PER_CPU={per_cpu} x SLURM_CPUS_ON_NODE={cpus}")
    return None


def guest_memory(asked: str | None, env: Mapping[str, str], default: str) -> tuple[str, str | None]:
    """UML's ``mem=`` value (``2048M``) and a one-line warning or None.

    ``asked`` is ``--mem`` (or $APPPOT_MEM).  Without it, inside a Slurm job the
    guest gets the allocation minus the margin, and ``default`` elsewhere.  With
    it, a guest that does not fit in the allocation is warned about.
    """
    allocation = slurm_allocation(env)
    if allocation is None:
        return parse_size(asked or default), None
    if not asked:
        log.info("guest memory %d MiB: the Slurm allocation (%s) minus %d MiB for UML itself",
                 allocation.guest_mib, allocation.source, allocation.margin_mib)
        if allocation.mib - allocation.margin_mib >= MIN_GUEST_MIB:
            return f"{allocation.guest_mib}M", None
        return f"{allocation.guest_mib}M", (
            f"the Slurm allocation of {allocation.mib} MiB ({allocation.source}) leaves less than {MIN_GUEST_MIB} "
            f"MiB for the guest after {allocation.margin_mib} MiB for UML itself: ask Slurm for more (--mem)")
    mem = parse_size(asked)
    guest_mib = int(mem.removesuffix("M"))
    if guest_mib + allocation.margin_mib <= allocation.mib:
        return mem, None
    return mem, (f"--mem {mem} and {allocation.margin_mib} MiB for UML itself exceed the Slurm allocation of "
                 f"{allocation.mib} MiB ({allocation.source}): a guest that fills its memory is killed by Slurm, "
                 f"not by its own OOM killer; leave out --mem to fit it ({allocation.guest_mib}M)")
