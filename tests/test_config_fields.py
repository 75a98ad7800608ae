"""Every config field is read somewhere: a knob that is accepted and ignored is a defect.

The dataclasses of ``prism_megatron/config.py`` and ``prism_megatron/pipeline/config.py`` are
walked; a field counts as read when prism_megatron reads it outside the schema's own validation
(``validate`` / ``check_config``: checking a knob's range is not using it): an attribute load
``x.<field>``, or ``getattr(x, "<field>", ...)`` / a helper called with the field's name as a
string (``_field(cfg, "megatron_dir", "")``). The check is by name, so it can only miss a dead
field whose name another object also uses; it never flags a live one.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from prism_megatron import config as prism_config
from prism_megatron.pipeline import config as pipeline_config

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "prism_megatron"
VALIDATION = {"validate", "check_config"}   # functions of the config modules that only check

# Fields allowed to be read nowhere: none (a knob that is accepted and ignored is a defect).
ALLOWED_UNREAD: set[str] = set()


def config_fields(*modules) -> dict[str, str]:
    """``"Class.field" -> field`` for every dataclass defined in ``modules``."""
    out = {}
    for module in modules:
        for obj in vars(module).values():
            if dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
                for f in dataclasses.fields(obj):
                    out[f"{obj.__name__}.{f.name}"] = f.name
    return out


def names_read(paths, skip_functions=frozenset()) -> set[str]:
    """Attribute names loaded, and string constants passed to calls, anywhere in ``paths`` except
    inside top-level functions named in ``skip_functions``."""
    read = set()
    for path in paths:
        tree = ast.parse(Path(path).read_text(), str(path))
        tree.body = [n for n in tree.body if not (
            isinstance(n, ast.FunctionDef) and n.name in skip_functions)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                read.add(node.attr)
            elif isinstance(node, ast.Call):
                read.update(a.value for a in node.args
                            if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return read


def unread(fields: dict[str, str], read: set[str]) -> list[str]:
    return sorted(key for key, name in fields.items() if name not in read)


def test_every_config_field_is_read():
    fields = config_fields(prism_config, pipeline_config)
    assert len(fields) > 100   # the walk found the schema
    dead = unread(fields, names_read(PACKAGE_DIR.rglob("*.py"), VALIDATION))
    assert [key for key in dead if key not in ALLOWED_UNREAD] == []


def test_allow_list_names_real_fields():
    assert ALLOWED_UNREAD <= set(config_fields(prism_config, pipeline_config))


def test_an_unread_field_is_found(tmp_path):
    """A planted dead knob fails the check (set, or only validated, is not read); reading it
    either way passes."""
    module = tmp_path / "use.py"
    module.write_text("def f(cfg):\n    cfg.data.epochs = 3\n    return cfg.data.shuffle\n\n\n"
                      "def validate(cfg):\n    assert cfg.model.megatron_dir\n")
    fields = {"DataConfig.epochs": "epochs", "DataConfig.shuffle": "shuffle",
              "ModelConfig.megatron_dir": "megatron_dir"}
    assert unread(fields, names_read([module], VALIDATION)) == [
        "DataConfig.epochs", "ModelConfig.megatron_dir"]
    assert unread(fields, names_read([module])) == ["DataConfig.epochs"]
    module.write_text("def f(cfg):\n    return cfg.data.epochs, cfg.data.shuffle, "
                      "getattr(cfg.model, 'megatron_dir', '')\n")
    assert unread(fields, names_read([module])) == []
