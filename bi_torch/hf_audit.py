"""Which RMSNorm classes a transformers release has, and which of them bi_torch/hf_table.py knows.

Read from the modeling files' source (`transformers/models/<family>/modeling_<family>.py`), so nothing
is imported: a release's classes can be compared with another's unpacked beside it (what
scripts/update_pins.sh does when it moves the pins). `python -m bi_torch.hf_audit NEW [--old OLD]`,
each a transformers package directory (default NEW: the installed one), prints the classes NEW adds,
changes or removes against OLD, each with what the table says of it, then the table's classes NEW
lacks. A class counts as an RMSNorm when its name contains "RMSNorm" or the table names it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .hf_table import EXCLUDED, TABLE


def installed_transformers() -> Path:
    """The directory of the importable transformers package (found, not imported)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("transformers is not installed; pass its directory")
    return Path(spec.origin).parent


def rmsnorm_classes(root: Path) -> Dict[str, str]:
    """Key as in the table ('transformers.models.<family>.modeling_<family>.<Class>') -> the class's
    source, for every top-level class of the modeling files under root/models that counts as an RMSNorm."""
    known = set(TABLE) | set(EXCLUDED)
    found: Dict[str, str] = {}
    for path in sorted(root.glob("models/*/modeling_*.py")):
        source = path.read_text(encoding="utf-8")
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        for node in ast.parse(source).body:
            key = f"{module}.{getattr(node, 'name', '')}"
            if isinstance(node, ast.ClassDef) and ("RMSNorm" in node.name or key in known):
                found[key] = ast.get_source_segment(source, node) or ""
    return found


def short(key: str) -> str:
    """'transformers.models.llama.modeling_llama.LlamaRMSNorm' -> 'llama.LlamaRMSNorm'."""
    parts = key.split(".")
    return f"{parts[2]}.{parts[-1]}"


def status(key: str) -> str:
    """What the table says of a class."""
    if key in TABLE:
        return f"table: mode {TABLE[key].mode!r}, offset {TABLE[key].weight_offset}"
    if key in EXCLUDED:
        return f"excluded: {EXCLUDED[key]}"
    return "NOT CLASSIFIED: read its forward (hf_table.py's rules)"


def changes(old: Dict[str, str], new: Dict[str, str]) -> List[str]:
    """One line per class new adds, changes (any line of its source) or removes against old, with
    what the table says of it (of a removed class, only if the table names it)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            lines.append(f"added    {short(key)}  [{status(key)}]")
        elif key not in new:
            named = key in TABLE or key in EXCLUDED
            lines.append(f"removed  {short(key)}" + (f"  [{status(key)}: remove or rename it]" if named else ""))
        elif old[key] != new[key]:
            lines.append(f"changed  {short(key)}  [{status(key)}]")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bi_torch.hf_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("new", nargs="?", type=Path, help="a transformers package directory (default: installed)")
    parser.add_argument("--old", type=Path, help="the transformers package directory to compare with")
    args = parser.parse_args(argv)
    new = rmsnorm_classes(args.new or installed_transformers())
    if args.old is not None:
        diff = changes(rmsnorm_classes(args.old), new)
        print(f"{len(diff)} RMSNorm classes added, changed or removed:")
        for line in diff:
            print(f"  {line}")
    missing = sorted((set(TABLE) | set(EXCLUDED)) - set(new))
    print(f"{len(missing)} classes of the table (TABLE, EXCLUDED) missing from this release")
    for key in missing:
        print(f"  {short(key)}")
    unknown = [key for key in new if key not in TABLE and key not in EXCLUDED]
    print(f"{len(new)} RMSNorm classes: {len(new) - len(unknown)} in the table, {len(unknown)} not "
          f"(patch_model skips them: 'not in bi_torch.hf_table.TABLE')")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
