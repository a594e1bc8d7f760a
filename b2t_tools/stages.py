"""Resumable stages, keyed on everything that built them: the WMT prepare and the demo's data share it.

A stage is done when its marker (FOLDER/.stages/NAME.json) exists, records the same key (the version of
the recipe, the stage's options, its inputs' fingerprints, the key of the stage before) and its outputs
still have the recorded sizes. Running a stage removes the markers of the later ones, so a changed
option reruns that stage and every stage after it, and a stopped run starts again where it stopped.
"""

import json
from pathlib import Path

from .util import atomic_open, json_digest


class Stages:
    def __init__(self, folder, order, version, log=print):
        self.dir, self.order, self.version, self.log = Path(folder) / ".stages", tuple(order), version, log

    def done(self, name, key=None):
        marker = self.dir / f"{name}.json"
        if not marker.exists():
            return False
        try:
            record = json.loads(marker.read_text())
        except ValueError:
            return False
        if key is not None and record.get("key") != key:
            return False
        return all(Path(p).exists() and (Path(p).is_dir() or Path(p).stat().st_size == n)
                   for p, n in record.get("outputs", {}).items())

    def recorded_key(self, name):
        try:
            return json.loads((self.dir / f"{name}.json").read_text()).get("key")
        except (OSError, ValueError):
            return None

    def run(self, name, outputs, fn, force=False, key=None):
        """Run fn() unless the stage is done with this key; returns the key's digest (for the next stage's key)."""
        key = dict(key or {}, recipe=self.version)
        if not force and self.done(name, key):
            self.log(f"{name}: complete, skipped")
            return json_digest(key)
        if (self.dir / f"{name}.json").exists() and not force:
            self.log(f"{name}: options or inputs changed since it was built; running it again")
        for later in self.order[self.order.index(name):]:
            (self.dir / f"{later}.json").unlink(missing_ok=True)
        self.log(f"{name}: running")
        fn()
        sizes = {str(p): (0 if Path(p).is_dir() else Path(p).stat().st_size) for p in outputs}
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.dir / f"{name}.json") as f:
            json.dump({"key": key, "outputs": sizes}, f, indent=1)
        self.log(f"{name}: done")
        return json_digest(key)
