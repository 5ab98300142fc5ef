"""Break each behaviour the issue-16 gap tests cover, one at a time, and check its test fails.

    python tests/mutants/check_gaps.py      (about 4 minutes; not part of the suite)

Each mutant is a text replacement in one source file; the file is restored afterwards whatever
happens. Prints one line per mutant: caught (the test failed) or SURVIVED.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# (what is broken, file, old text, new text, tests that must fail)
MUTANTS = [
    ("the worker drops `stop` before calling the backend", "workers/main.py",
     "            sampling=req,\n", "            sampling={k: v for k, v in req.items() if k != 'stop'},\n",
     "tests/integration/test_promises.py::test_stop_strings_end_the_text_through_the_supervisor"),
    ("no PR_SET_PDEATHSIG", "workers/main.py",
     "ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)", "pass",
     "tests/integration/test_shutdown.py::test_a_frozen_worker_dies_with_its_supervisor_all_the_same"),
    ("a cancel finds another client's request", "supervisor/requests.py",
     "        req = self.table.get(key)\n        if req is None:\n            return False, []",
     "        req = next((r for r in self.table.values() if r.rid == key[1]), None)\n"
     "        if req is None:\n            return False, []",
     "tests/integration/test_promises.py::test_a_client_cannot_cancel_another_clients_request"),
    ("requests keyed by id alone", "supervisor/requests.py",
     "        key = (client, request.id)\n        self._job_seq += 1",
     "        key = (b'', request.id)\n        self._job_seq += 1",
     "tests/integration/test_promises.py::test_two_clients_may_use_the_same_ids"),
    ("socket_mode ignored", "supervisor/frontend.py",
     "os.chmod(path, socket_mode)", "os.chmod(path, 0o600)",
     "tests/integration/test_promises.py::test_socket_mode_sets_the_socket_files_permissions"),
    ("SIGHUP not handled", "supervisor/wakeup.py",
     "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)", "STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)",
     "tests/integration/test_promises.py::test_sighup_shuts_the_supervisor_down_cleanly"),
    ("no SIGKILL after stop_grace", "supervisor/worker_process.py",
     "            self.signal(signal.SIGKILL)\n            self.kill_at = None\n            return True",
     "            self.kill_at = None\n            return False",
     "tests/integration/test_promises.py::test_a_worker_deaf_to_sigterm_is_killed_after_stop_grace"),
    ("batch gives up on overloaded", "supervisor/batch.py",
     "            except Overloaded:  # the queue is full for now: wait for room, it is not this item's fault\n"
     "                await asyncio.sleep(delay)",
     "            except ZeroDivisionError:\n                await asyncio.sleep(delay)",
     "tests/integration/test_promises.py::test_batch_waits_out_a_full_queue_and_every_item_completes"),
    ("batch interrupted exits 1", "supervisor/cli.py", "raise typer.Exit(130)", "raise typer.Exit(1)",
     "tests/integration/test_promises.py::test_batch_interrupted_exits_130_with_whole_lines_and_the_rerun_finishes"),
    ("EHOSTUNREACH never means gone", "supervisor/frontend.py",
     "            if now - self.last_full.get(client, -CLIENT_GONE_S) >= CLIENT_GONE_S and client not in self.outboxes:\n"
     "                return Delivery.GONE",
     "            if False:\n                return Delivery.GONE",
     "tests/integration/test_promises.py::test_a_send_to_a_client_that_left_is_found_gone"),
    ("a replica test's assertion", "supervisor/scheduler.py",
     "extra_needed = len(self.queues[model]) > loading and", "extra_needed = len(self.queues[model]) > loading + 1 and",
     "tests/unit/test_scheduler_memory.py::test_one_loading_worker_covers_one_waiting_request"),
    ("the VIP is told a position behind others", "supervisor/scheduler.py",
     "actions.append(Notify(job.key, loading=loading, position=queue.position(job.key)))",
     "actions.append(Notify(job.key, loading=loading, position=len(queue) - 1))",
     "tests/integration/test_fairness.py::test_priority_is_served_first_within_a_model"),
]


def main() -> int:
    survived = 0
    for what, rel, old, new, test in MUTANTS:
        path = ROOT / rel
        original = path.read_text()
        if original.count(old) != 1:
            print(f"STALE    {what}: the text to replace is not in {rel} once")
            survived += 1
            continue
        path.write_text(original.replace(old, new))
        try:
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
        finally:
            path.write_text(original)
        caught = run.returncode != 0
        survived += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} {what} ({test.split('::')[-1]})", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
