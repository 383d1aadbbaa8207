"""Multi-host start-up: one JAX process per host, joined through a coordinator."""

from __future__ import annotations

import argparse
import os

import jax

from mtj import platforms


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--coordinator", default=os.environ.get("MTJ_COORDINATOR"),
                    help="host:port of process 0 (multi-host; auto-detected on TPU VMs; or MTJ_COORDINATOR)")
    ap.add_argument("--num-processes", type=int, default=_env_int("MTJ_NUM_PROCESSES"),
                    help="processes in the job, with --coordinator (or MTJ_NUM_PROCESSES)")
    ap.add_argument("--process-id", type=int, default=_env_int("MTJ_PROCESS_ID"),
                    help="this process's index, 0 to num-processes - 1, with --coordinator (or MTJ_PROCESS_ID)")
    ap.add_argument("--heartbeat-timeout", type=int, default=100,
                    help="seconds without heartbeats before a process counts as dead and the others exit")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def initialize(args: argparse.Namespace) -> None:
    """Join the other processes: explicitly when --coordinator is given, automatically on a TPU pod.

    JAX's preemption service stays off: it would take SIGTERM (a preempted VM's notice) from mtj's handler
    (`mtj.train.StopRequests`, which stops every process at the next step), agree on a step only after a
    protocol of a second or two, and make exiting processes wait up to 3 minutes at its barrier."""
    jax.config.update("jax_enable_preemption_service", False)
    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise SystemExit("--coordinator needs --num-processes and --process-id (or MTJ_NUM_PROCESSES/MTJ_PROCESS_ID)")
        if platforms.gloo_collectives():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        # a TPU pod slice: everything comes from the metadata server
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout)
