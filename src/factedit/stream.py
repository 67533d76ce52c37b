"""One sequential-stream protocol, for the command line (``factedit edit --state``), the evaluation runner
(sequential mode) and, later, a service.

A stream is a folder holding an editor's sequential state (``Editor.save_state``: safetensors + JSON) and the
chain of the rounds it committed, each named by the digest of its patch tensors (``patch_digest``). A round is
committed in three steps, in this order, so that an interruption anywhere leaves a consistent stream:

1. the round's patch is computed and saved (with what committing it adds to the editor state: its declared
   ``commit_data``, e.g. MEMIT/AlphaEdit's keys, NSE's original weights);
2. the editor commits the patch (``Editor.commit``, from the saved commit data alone);
3. the state is saved with the chain extended by the patch's digest.

A patch saved but not in the chain is the *unfinished round*: resuming commits it as saved (no recomputation).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .errors import FactEditError
from .lm.load import LM
from .methods.base import Editor
from .patch.base import Patch
from .patch.io import patch_digest

log = logging.getLogger(__name__)


class EditStream:
    def __init__(self, state_dir: Path, method: str, what: str = "--state") -> None:
        """The stream of ``method`` edits in ``state_dir``; its rounds can be checked before any model loads, and
        ``restore`` binds the editor that continues it."""
        self.dir, self.method, self.what = Path(state_dir), method, what
        self.editor: Editor | None = None
        self.record = self._read()

    # ---- the record ------------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        rec_path = self.dir / "state.json"
        if not rec_path.is_file():
            if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
                raise FactEditError(f"{self.what} {self.dir}: not an editor state folder (no state.json)")
            return None
        try:
            return json.loads(rec_path.read_text())
        except ValueError as e:
            raise FactEditError(f"{rec_path}: not valid JSON ({e})") from None

    @property
    def chain(self) -> list[str]:
        return list((self.record or {}).get("chain", []))

    @property
    def n_rounds(self) -> int:
        return len(self.chain)

    # ---- checks, before any model work -----------------------------------------------------------------
    def check_rounds(self, digests: list[str], names: list[str] | None = None, source: str = "the rounds") -> None:
        """Refuse a state of another method, or one that did not commit exactly the rounds ``digests``, in order
        (``names``: how the user named them, ``source``: where they came from, for the messages)."""
        names = names or [f"round {i + 1}" for i in range(len(digests))]
        rec = self.record
        if rec is None:
            if digests:
                raise FactEditError(f"{self.what} {self.dir} does not exist, but {source} gives {len(digests)} "
                                    "earlier round(s): pass the state folder those rounds wrote")
            return
        if rec.get("method") != self.method:
            raise FactEditError(f"{self.what} {self.dir} holds a stream of {rec.get('method')} edits, "
                                f"not {self.method}")
        saved = rec.get("chain")
        if not isinstance(saved, list):
            raise FactEditError(f"{self.what} {self.dir} has no round list; start a new state folder")
        for i in range(max(len(saved), len(digests))):
            have = digests[i] if i < len(digests) else None
            want = saved[i] if i < len(saved) else None
            if have != want:
                if want is None:
                    why = f"{names[i]} is not a round of this stream (it committed {len(saved)})"
                elif have is None:
                    why = f"round {i + 1} of {len(saved)} is missing from {source}"
                else:
                    why = f"{names[i]} is not round {i + 1} of this stream (patch {have}, the state has {want})"
                raise FactEditError(f"{self.what} {self.dir}: {why}; {source} must list the patches this state "
                                    "committed, in order")

    def check_model(self, lm: LM, editor: Editor) -> None:
        """Refuse a state of another base model or accumulated with other state-defining settings."""
        rec = self.record
        if rec is None:
            return
        if rec.get("base_fingerprint") != lm.fingerprint:
            raise FactEditError(f"{self.what} {self.dir} belongs to a model with fingerprint "
                                f"{rec.get('base_fingerprint')}, not {lm.name} ({lm.fingerprint})")
        now, old = editor.config_dict(), rec.get("config", {})
        bad = [k for k in editor.STATE_KEYS if old.get(k) != now.get(k)]
        if bad:
            raise FactEditError(f"{self.what} {self.dir} was accumulated with other {', '.join(bad)} "
                                f"({', '.join(f'{k}={old.get(k)}' for k in bad)}); start a new state folder")
        changed = sorted(k for k in now if k in old and old[k] != now[k])
        if changed:
            log.warning("%s: config differs from the earlier rounds' in %s", editor.name, ", ".join(changed))

    def restore(self, lm: LM, editor: Editor) -> int:
        """Check the state against the model and the editor, load it into the editor, and bind the editor to the
        stream; the number of committed rounds."""
        if editor.name != self.method:
            raise FactEditError(f"{self.what} {self.dir}: a {self.method} stream cannot be continued by {editor.name}")
        self.check_model(lm, editor)
        if self.record is not None:
            editor.load_state(self.dir)
        self.editor = editor
        return self.n_rounds

    def is_unfinished(self, patch_dir: Path, tag: dict[str, Any]) -> bool:
        """Whether ``patch_dir`` holds this stream's next round, saved (tagged ``tag``) but not committed."""
        try:
            meta = json.loads((Path(patch_dir) / "manifest.json").read_text()).get("meta", {})
        except (OSError, ValueError):
            return False
        return meta.get("stream") == tag and self.n_rounds < int(tag["round"])

    # ---- committing a round ------------------------------------------------------------------------------
    def commit(self, patch: Patch, patch_dir: Path, lm: LM, **extra: Any) -> None:
        """Commit a saved round: the editor takes the patch's commit data, the state is saved with the chain
        extended by the patch's digest."""
        if self.editor is None:
            raise FactEditError(f"{self.what} {self.dir}: restore() the stream with its editor before committing")
        digest = patch_digest(patch_dir)
        self.editor.commit(patch)
        n_facts = (self.record or {}).get("n_facts", 0) + len(patch.requests)
        self.editor.save_state(self.dir, chain=self.chain + [digest], base_fingerprint=lm.fingerprint,
                               model=lm.name, n_facts=n_facts, **extra)
        self.record = self._read()
