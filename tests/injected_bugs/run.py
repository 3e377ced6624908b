#!/usr/bin/env python3
"""Injects each engine bug below in turn, runs a swarm test, and reports the seed that caught
it; the source is restored after each. Run from the crate's root:

    python3 tests/injected_bugs/run.py [engine|shop]

Each bug is (name, file, text, replacement): a one-line change a careless edit could make.
"""
import subprocess
import sys

BUGS = [
    ("an ack that does not remove the message", "src/core/queue/mod.rs",
     "    pub fn handle_ack(&mut self, seq: u64) -> Option<Entry> {\n        self.take_unacked(seq)\n",
     "    pub fn handle_ack(&mut self, seq: u64) -> Option<Entry> {\n        self.unacked.get(&seq).map(|u| u.entry.clone())\n"),
    ("a requeue that loses the redelivered flag", "src/core/queue/mod.rs",
     "        let mut entry = self.take_unacked(seq)?;\n        entry.delivered = true;\n",
     "        let mut entry = self.take_unacked(seq)?;\n        entry.delivered = false;\n"),
    ("a channel close that forgets what it held", "src/runtime/channel.rs",
     "        self.apply(&closing.ledger, Settle::Return);\n",
     "        let _ = &closing.ledger;\n"),
    ("an expired message dropped instead of dead-lettered", "src/runtime/queue.rs",
     "            let dead_letters = self.dead_letter.load().is_some()\n",
     "            let dead_letters = self.dead_letter.load().is_some() && death != DeathReason::Expired\n"),
    ("a delivery limit one higher than asked", "src/core/queue/mod.rs",
     "            .is_some_and(|limit| entry.delivery_count > limit)\n",
     "            .is_some_and(|limit| entry.delivery_count > limit + 1)\n"),
]

TESTS = {
    "engine": ["--test", "swarm", "engine_swarm"],
    "shop": ["--test", "shop_sim", "order_flow_swarm"],
}


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "engine"
    for name, path, text, replacement in BUGS:
        original = open(path).read()
        assert original.count(text) == 1, f"{name}: the text to change is not in {path} once"
        open(path, "w").write(original.replace(text, replacement))
        try:
            out = subprocess.run(["cargo", "test", "-q", *TESTS[which]],
                                 capture_output=True, text=True)
        finally:
            open(path, "w").write(original)
        caught = [line for line in (out.stdout + out.stderr).splitlines() if "failed:" in line and "seed" in line]
        print(f"{name}: " + (caught[0].strip() if caught else "NOT CAUGHT"))


if __name__ == "__main__":
    main()
