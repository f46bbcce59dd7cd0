"""Config schema, YAML files, dotted overrides, validation errors, and the CLI's error handling."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aikd.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TeacherConfig,
    TrainConfig,
    from_dict,
    load_config,
    save_config,
)
from aikd.errors import ConfigError

CONFIG_YAML = """\
method: ce
seed: 0
data:
  name: fashion-mnist
  batch_size: 64
model:
  name: small_cnn
train:
  epochs: 10
"""


@pytest.fixture
def cfg_file(tmp_path) -> Path:
    path = tmp_path / "ce.yaml"
    path.write_text(CONFIG_YAML)
    return path


def _error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------- files and overrides

def test_yaml_file_plus_overrides(cfg_file):
    cfg = load_config(cfg_file, ["train.epochs=2", "data.train_limit=2000", "seed=1",
                                 "train.milestones=[0.3,0.6]", "train.lr=1e-4"])
    assert cfg.method == "ce"
    assert cfg.model.name == "small_cnn"
    assert cfg.data.batch_size == 64  # from the file
    assert cfg.train.epochs == 2 and type(cfg.train.epochs) is int
    assert cfg.data.train_limit == 2000
    assert cfg.seed == 1
    assert cfg.train.milestones == [0.3, 0.6]
    # YAML 1.1 reads 1e-4 (no dot) as the string '1e-4'; the schema makes it a float
    assert isinstance(cfg.train.lr, float)
    assert cfg.train.lr == 0.0001
    # untouched keys keep the paper's defaults
    assert cfg.train.momentum == 0.9
    assert cfg.train.gamma == 0.1


def test_file_values_and_later_overrides_win(cfg_file):
    cfg = load_config(cfg_file, ["train.epochs=3", "train.epochs=4", "data.root=/data/fm", "data.test_limit=null"])
    assert cfg.train.epochs == 4
    assert cfg.data.root == "/data/fm"
    assert cfg.data.test_limit is None


def test_integer_for_float_key_becomes_float(cfg_file):
    cfg = load_config(cfg_file, ["train.lr=1", "train.milestones=[1]"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == [1.0] and isinstance(cfg.train.milestones[0], float)


def test_defaults_are_the_papers_recipe():
    for cfg in (RunConfig(), load_config(None), from_dict({})):
        t = cfg.train
        assert t.epochs == 300
        assert t.lr == 0.1
        assert t.momentum == 0.9
        assert t.nesterov is True
        assert t.weight_decay == 5e-4
        assert t.milestones == [0.5, 0.75]
        assert t.gamma == 0.1
        assert cfg.method == "ce"


def test_empty_yaml_file_is_an_error_not_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(path)  # it would train PreAct ResNet-18 for 300 epochs without a word


def test_to_dict_round_trips_through_from_dict(cfg_file, tmp_path):
    cfg = load_config(cfg_file, ["train.lr=0.05", "train.milestones=[0.25]", "data.augment=none",
                                 "deterministic=true", "teacher.checkpoint=/x/t.safetensors"])
    plain = cfg.to_dict()
    assert "methods" not in plain
    assert plain["ce"] == {}  # method sections are top-level keys
    again = from_dict(plain)
    assert again == cfg
    assert again.to_dict() == plain
    # and through a YAML file
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_hparams_is_the_selected_methods_section():
    assert type(from_dict({"method": "ce"}).hparams).__name__ != type(from_dict({"method": "kd"}).hparams).__name__
    kd = from_dict({"method": "kd", "kd": {"alpha": 0.3}})
    assert kd.hparams.alpha == 0.3 and kd.to_dict()["kd"]["alpha"] == 0.3
    assert from_dict({"method": "kd"}).hparams == type(kd.hparams)()  # no section: the defaults


def test_another_methods_section_is_checked_and_dropped():
    """A sweep applies its overrides to every config, so a ce config may carry an aikd section: checked, not kept."""
    cfg = from_dict({"method": "ce", "kd": {"alpha": 0.3}})
    assert "kd" not in cfg.to_dict() and cfg.to_dict() == from_dict({"method": "ce"}).to_dict()
    with pytest.raises(ConfigError, match=r"Unknown config key 'kd\.alpah'\. Did you mean 'alpha'\?"):
        from_dict({"method": "ce", "kd": {"alpah": 0.3}})
    with pytest.raises(ConfigError, match=r"Config key 'kd\.alpha' is a weight in \[0, 1\], got 3"):
        from_dict({"method": "ce", "kd": {"alpha": 3}})


def test_config_does_not_import_the_methods():
    """The method schemas come from aikd.registry.METHOD_CONFIGS, which importing aikd fills."""
    import ast
    import importlib.util

    from aikd.registry import METHOD_CONFIGS

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("import_graph", root / "scripts" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    imports = graph.imported(ast.parse((root / "src" / "aikd" / "config.py").read_text()), "aikd.config", False)
    assert not [m for m in imports if m.startswith("aikd.methods")], imports
    assert {"ce", "kd", "aikd", "pskd"} <= set(METHOD_CONFIGS.names())


def test_a_method_registered_for_a_while_takes_its_schema_with_it():
    from aikd.methods import METHODS, Method, register_method
    from aikd.registry import METHOD_CONFIGS

    @dataclasses.dataclass
    class Settings:
        strength: float = 1.0

    for _ in range(2):  # registered again after its removal, as a test fixture does
        register_method("plugin_for_a_while", Settings)(type("Plugin", (Method,), {}))
        assert from_dict({"method": "plugin_for_a_while", "plugin_for_a_while": {"strength": 2}}).hparams.strength == 2
        METHODS.remove("plugin_for_a_while")
        assert "plugin_for_a_while" not in METHOD_CONFIGS
    with pytest.raises(ConfigError, match="Unknown method 'plugin_for_a_while'"):
        from_dict({"method": "plugin_for_a_while"})


def test_sections_check_their_ranges_when_built_in_code_too():
    RunConfig(), DataConfig(), TrainConfig()  # the defaults pass
    with pytest.raises(ConfigError, match=r"Config key 'data\.holdout' is a fraction .* got 1\.0\."):
        DataConfig(holdout=1.0)
    with pytest.raises(ConfigError, match=r"Config key 'train\.epochs' must be positive, got 0\."):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match=r"Config key 'device' must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"):
        RunConfig(device="gpu")


# ---------------------------------------------------------------- errors

def test_unknown_section_suggests_the_right_one(cfg_file):
    msg = _error(cfg_file, ["trian.epochs=2"])
    assert "'trian'" in msg
    assert "Did you mean 'train'" in msg


def test_unknown_key_suggests_the_right_one(cfg_file):
    msg = _error(cfg_file, ["train.epoch=2"])
    assert "'train.epoch'" in msg
    assert "Did you mean 'epochs'" in msg


@pytest.mark.parametrize(("override", "key", "shown"), [
    ("train.epochs=abc", "train.epochs", "'abc'"),
    ("train.nesterov=3", "train.nesterov", "3"),
    ("train.epochs=2.5", "train.epochs", "2.5"),
    ("train.epochs=true", "train.epochs", "True"),
    ("train.lr=fast", "train.lr", "'fast'"),
    ("train.milestones=0.5", "train.milestones", "0.5"),
    ("train.milestones=[0.5,x]", "train.milestones[1]", "'x'"),
    ("data.train_limit=many", "data.train_limit", "'many'"),
    ("seed=[1]", "seed", "[1]"),
    ("data=3", "data", "3"),
])
def test_wrong_type_names_key_and_value(cfg_file, override, key, shown):
    msg = _error(cfg_file, [override])
    assert f"'{key}'" in msg
    assert shown in msg


def test_bad_literal_lists_the_choices(cfg_file):
    msg = _error(cfg_file, ["data.augment=strong"])
    assert "'data.augment'" in msg and "'strong'" in msg
    assert "'standard'" in msg and "'none'" in msg
    assert "Did you mean 'standard'" in _error(cfg_file, ["data.augment=standrad"])


def test_unknown_method(cfg_file):
    msg = _error(cfg_file, ["method=nosuchmethod"])
    assert "'nosuchmethod'" in msg
    assert "method" in msg
    assert "ce" in msg  # the available methods are listed


def test_unknown_model_name_is_refused_when_building():
    from aikd.models import build_model

    with pytest.raises(ConfigError) as info:
        build_model("resnet81", 10, 3, 32)
    msg = str(info.value)
    assert "'resnet81'" in msg and "model.name" in msg
    assert "Did you mean 'resnet18'" in msg


def test_unknown_dataset_name_is_refused_when_loading():
    from aikd.data import load_data

    with pytest.raises(ConfigError) as info:
        load_data(DataConfig(name="cifar1000"))
    msg = str(info.value)
    assert "'cifar1000'" in msg and "data.name" in msg
    assert "Did you mean 'cifar100'" in msg


@pytest.mark.parametrize("milestones", ["[0.5,1.5]", "[0,0.5]", "[-0.1]"])
def test_milestone_outside_unit_interval(cfg_file, milestones):
    msg = _error(cfg_file, [f"train.milestones={milestones}"])
    assert "train.milestones" in msg
    assert "(0, 1]" in msg


def test_milestone_one_is_allowed(cfg_file):
    assert load_config(cfg_file, ["train.milestones=[1.0]"]).train.milestones == [1.0]


@pytest.mark.parametrize(("override", "key", "value"), [
    ("train.epochs=-1", "train.epochs", "-1"),
    ("train.epochs=0", "train.epochs", "0"),
    ("data.batch_size=0", "data.batch_size", "0"),
    ("data.train_limit=-5", "data.train_limit", "-5"),
    ("train.lr=0", "train.lr", "0"),
    ("train.momentum=-0.5", "train.momentum", "-0.5"),
    ("train.lr=.nan", "train.lr", "nan"),
    ("train.lr=.inf", "train.lr", "inf"),
    ("device=gpu", "device", "'gpu'"),
    ("data.holdout=1", "data.holdout", "1"),
    ("data.mix_prob=1.5", "data.mix_prob", "1.5"),
    ("data.num_workers=-1", "data.num_workers", "-1"),
    ("data.crop_padding=-2", "data.crop_padding", "-2"),
    ("train.keep_last=0", "train.keep_last", "0"),
])
def test_out_of_range_values(cfg_file, override, key, value):
    msg = _error(cfg_file, [override])
    assert key in msg
    assert value in msg


def test_huge_integer_for_float_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        from_dict({"train": {"lr": 10 ** 400}})


def test_methods_is_not_a_settable_key():
    with pytest.raises(ConfigError, match="methods"):
        from_dict({"methods": {}})
    with pytest.raises(ConfigError, match="Config key 'hparams' cannot be set"):
        from_dict({"hparams": {}})


def test_malformed_overrides(cfg_file):
    assert "KEY=VALUE" in _error(cfg_file, ["train.epochs"])
    assert "empty key" in _error(cfg_file, ["train..epochs=2"])
    assert "'seed' is a value" in _error(cfg_file, ["seed.x=1"])


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = _error(path)
    assert str(path) in msg and "does not exist" in msg


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: {epochs: [1\n")
    msg = _error(path)
    assert str(path) in msg and "not valid YAML" in msg


def test_yaml_value_pyyaml_cannot_build(tmp_path):
    path = tmp_path / "date.yaml"
    path.write_text("data:\n  root: 2020-13-45\n")  # a "date" with month 13
    assert str(path) in _error(path)
    # as an override the same text is kept as a string
    assert load_config(None, ["data.root=2020-13-45"]).data.root == "2020-13-45"


def test_binary_file_as_config(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    assert str(path) in _error(path)


def test_yaml_file_holding_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- train\n- epochs\n")
    msg = _error(path)
    assert str(path) in msg and "mapping" in msg and "list" in msg


def test_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("train: 5\n")
    msg = _error(path)
    assert "'train'" in msg and "mapping" in msg


# ---------------------------------------------------------------- property: ConfigError or a RunConfig

_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "teacher": TeacherConfig}
_TOP_KEYS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _SECTIONS]  # includes 'hparams'

_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
            | st.sampled_from([0, 1, 2, 0.5, 1e-4, "1e-4", "standard", "none", "auto", "cpu", "ce",
                               "small_cnn", "buffer", [0.5], [0.3, 0.9], 10 ** 400]))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _section(draw, fields: list[str]):
    keys = (st.sampled_from(fields) | st.text(max_size=8)) if fields else st.text(max_size=8)
    return draw(st.dictionaries(keys, _values, max_size=4))


@st.composite
def _config_dicts(draw):
    from aikd.config import method_schemas

    schemas = method_schemas()
    sections = dict(_SECTIONS)
    sections.update(schemas)
    data = {}
    for name, schema in sections.items():
        if draw(st.booleans()):
            fields = [f.name for f in dataclasses.fields(schema)]
            data[name] = draw(_section(fields) | _values)
    for key in draw(st.lists(st.sampled_from(_TOP_KEYS) | st.text(max_size=8), max_size=4)):
        data[key] = draw(_values)
    if draw(st.booleans()):
        data["method"] = draw(st.sampled_from(sorted(schemas)))
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_config_dicts())
@example({"train": {"lr": 10 ** 400}})
@example({"methods": {"ce": {}}})
@example({"hparams": {}})
@example({1: 2, "data": {None: 1}})
@example({"train": {"epochs": 5, "milestones": [0.2, 1.0]}, "data": {"augment": "none"}})
def test_from_dict_returns_config_or_config_error(data):
    try:
        cfg = from_dict(data)
    except ConfigError as err:
        assert str(err)
    else:
        assert isinstance(cfg, RunConfig)
        assert cfg.train.epochs > 0
        assert all(0 < m <= 1 for m in cfg.train.milestones)


_override_keys = st.sampled_from([
    "seed", "method", "device", "train.epochs", "train.lr", "train.milestones", "train.nesterov",
    "data.augment", "data.train_limit", "data.root", "model.name", "teacher.checkpoint", "train", "x.y",
]) | st.text(st.characters(codec="ascii", exclude_characters="="), max_size=10)
_override_values = st.text(st.characters(codec="ascii"), max_size=12) | st.sampled_from([
    "2020-13-45", "!!float abc", "!!bool maybe", "[0.5", "{a: 1}", "1e400", "-1", "null", "~", "'x'"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_override_keys, _override_values), max_size=3))
def test_overrides_return_config_or_config_error(pairs):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError as err:
        assert str(err)
    else:
        assert isinstance(cfg, RunConfig)


# ---------------------------------------------------------------- command line

# Each `python -m aikd` that reaches the training code imports torch, torchvision and
# torchmetrics (several seconds), so every CLI case is started at once, in parallel.
CLI_ERROR_CASES = {
    "unknown_key": (["train", "-c", "{cfg}", "-o", "{tmp}/run1", "train.epoch=1"], ["train.epoch", "epochs"]),
    "unknown_method": (["train", "-c", "{cfg}", "-o", "{tmp}/run2", "method=nosuchmethod"], ["nosuchmethod"]),
    "missing_config": (["train", "-c", "{tmp}/missing.yaml", "-o", "{tmp}/run3"], ["{tmp}/missing.yaml"]),
    "missing_checkpoint": (["eval", "-k", "missing.safetensors"], ["missing.safetensors"]),
}
CLI_HELP_CASES = {"main": ["--help"], "train": ["train", "--help"], "eval": ["eval", "--help"],
                  "demo": ["demo", "--help"], "pipeline": ["pipeline", "--help"], "sweep": ["sweep", "--help"],
                  "report": ["report", "--help"], "tsne": ["tsne", "--help"]}


class _CliRuns:
    """The CLI cases as background processes, started together, awaited on first use."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        cfg = tmp / "ce.yaml"
        cfg.write_text(CONFIG_YAML)
        commands = {f"error:{name}": [a.format(cfg=cfg, tmp=tmp) for a in args]
                    for name, (args, _) in CLI_ERROR_CASES.items()}
        commands.update({f"help:{name}": args for name, args in CLI_HELP_CASES.items()})
        self.procs = {name: subprocess.Popen([sys.executable, "-m", "aikd", *args], cwd=tmp,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      for name, args in commands.items()}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.results:
            proc = self.procs[name]
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.results[name]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory):
    """Started with the module's first test, so the slow imports overlap the other tests."""
    if not any(item.name.startswith("test_cli_") and getattr(item, "module", None) is request.module
               for item in request.session.items):
        yield None  # no CLI test selected
        return
    runs = _CliRuns(tmp_path_factory.mktemp("cli"))
    yield runs
    runs.close()


@pytest.mark.parametrize("case", sorted(CLI_ERROR_CASES))
def test_cli_user_errors_are_one_clean_paragraph(cli_runs, case):
    tmp = cli_runs.tmp
    proc = cli_runs[f"error:{case}"]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("aikd: error:")
    assert "\n\n" not in err  # one paragraph
    assert len(err.splitlines()) <= 3
    for needle in CLI_ERROR_CASES[case][1]:
        assert needle.format(tmp=tmp) in err
    assert proc.stdout == ""
    assert not any(tmp.glob("run*"))  # nothing was started


@pytest.mark.parametrize("case", sorted(CLI_HELP_CASES))
def test_cli_help_has_examples(cli_runs, case):
    proc = cli_runs[f"help:{case}"]
    assert proc.returncode == 0, proc.stderr
    assert "example" in proc.stdout
    assert proc.stdout.startswith("usage: aikd")


# ---------------------------------------------------------------------- checked before any compute


def test_string_options_take_the_override_text_not_its_yaml_reading():
    cfg = load_config(None, ["train.channels_last=on", "teacher.checkpoint=1.10", "data.root=yes"])
    assert cfg.train.channels_last == "on" and cfg.teacher.checkpoint == "1.10" and cfg.data.root == "yes"
    assert load_config(None, ["train.channels_last=off"]).train.channels_last == "off"
    cfg = load_config(None, ["teacher.checkpoint=null", "train.epochs=3", "train.lr=1e-3", "data.flip=false"])
    assert cfg.teacher.checkpoint is None and cfg.train.epochs == 3 and cfg.train.lr == 0.001
    assert cfg.data.flip is False
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=on"])


def _numeric_fields():
    from aikd.registry import METHOD_CONFIGS

    for name in METHOD_CONFIGS.names():
        for field in dataclasses.fields(METHOD_CONFIGS.get(name)):
            if field.type in ("float", "int", "float | None", "int | None"):
                yield name, field.name


@pytest.mark.parametrize(("method", "key"), list(_numeric_fields()))
def test_every_method_range_is_checked_when_the_config_is_read(method, key):
    """No hyper-parameter of any registered method may be negative; from_dict says which."""
    with pytest.raises(ConfigError, match=rf"{method}\.{key}"):
        from_dict({"method": method, method: {key: -1}})


def test_unknown_names_are_refused_when_the_config_is_read():
    for override, key in (("model.name=resnet19", "model.name"), ("teacher.model=resnet19", "teacher.model"),
                          ("data.name=cifar1000", "data.name"), ("method=aikdd", "method")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


@pytest.mark.parametrize("command", [
    ["train", "-c", "configs/fashion_mnist/aikd.yaml", "-o", "{out}", "aikd.alpha_g=0.9"],
    ["pipeline", "-c", "configs/fashion_mnist/aikd.yaml", "-o", "{out}", "aikd.alpha_g=0.9"],
    ["sweep", "-c", "configs/fashion_mnist/aikd.yaml", "configs/fashion_mnist/pskd.yaml", "--seeds", "0", "1",
     "-o", "{out}", "--grid", "aikd.alpha_g=0.1,0.9"],
    ["train", "-c", "configs/fashion_mnist/ce.yaml", "-o", "{out}", "model.name=resnet19"],
])
def test_bad_values_stop_every_command_before_data_or_training(tmp_path, command):
    out = tmp_path / "out"
    # A data folder that does not exist: reading data first would fail with a data error instead.
    args = [a.format(out=out) for a in command] + [f"data.root={tmp_path / 'no-data'}"]
    done = subprocess.run([sys.executable, "-m", "aikd", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert "aikd.alpha_g" in done.stderr or "model.name" in done.stderr
    assert "does not exist" not in done.stderr and not out.exists()


def test_command_line_takes_overrides_after_options_and_names_config_mistakes(tmp_path, capsys):
    from aikd.cli import build_parser, main, parse

    args = parse(build_parser(), ["train", "-c", "c.yaml", "-o", "out", "--quiet", "data.train_limit=5", "seed=2"])
    assert args.quiet and args.overrides == ["data.train_limit=5", "seed=2"]
    args = parse(build_parser(), ["sweep", "-c", "a.yaml", "data.holdout=0.1", "--seeds", "0", "1", "-o", "o",
                                  "train.lr=0.2"])
    assert args.seeds == [0, 1] and args.overrides == ["data.holdout=0.1", "train.lr=0.2"]
    with pytest.raises(SystemExit):
        parse(build_parser(), ["train", "-c", "c.yaml", "-o", "out", "--bogus"])
    folder = tmp_path / "configs"
    (folder / "set").mkdir(parents=True)
    (folder / "set" / "ce.yaml").write_text("method: ce\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing but a comment\n")
    for config, message in ((folder, f"'{folder}' is a folder; give one of its YAML files, for example "
                                     f"'{folder / 'set' / 'ce.yaml'}'"),
                            (empty, f"'{empty}' is empty")):
        assert main(["train", "-c", str(config), "-o", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
    assert main(["train", "-c", str(folder / "set" / "ce.yaml"), "-o", str(tmp_path / "run"), "--quiet",
                 "train.batch_size=0"]) == 2
    assert "Unknown config key 'train.batch_size'. Did you mean 'data.batch_size'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# A value other than the default for each renamed AI-KD key, by its new name.
RENAMED_VALUES = {"previous": "snapshot", "critic_hidden": 16, "critic_out": 8, "critic_slope": 0.1,
                  "critic_reduce": "sum", "critic_norm": "layer", "critic_lr": 2e-4, "critic_betas": [0.5, 0.9]}


def _renamed_keys() -> list[tuple[str, str]]:
    from aikd.methods.aikd import AIKDConfig

    return sorted(AIKDConfig.RENAMED_KEYS.items())


def test_every_renamed_key_has_a_value_to_test():
    assert {new for _, new in _renamed_keys()} == set(RENAMED_VALUES)


@pytest.mark.parametrize(("old", "new"), _renamed_keys())
def test_a_renamed_aikd_key_is_read_under_its_old_name_with_a_warning_naming_both(old, new):
    from aikd.errors import RenamedKeyWarning
    from aikd.methods.aikd import AIKDConfig

    value = RENAMED_VALUES[new]
    with pytest.warns(RenamedKeyWarning, match=rf"'aikd\.{old}' is now 'aikd\.{new}'"):
        cfg = from_dict({"method": "aikd", "aikd": {old: value}})
    assert getattr(cfg.hparams, new) == value != getattr(AIKDConfig(), new)
    assert old not in cfg.to_dict()["aikd"] and cfg.to_dict()["aikd"][new] == value  # saved under the new name


def test_an_old_key_in_an_override_is_read_too_and_both_names_at_once_are_refused():
    from aikd.errors import RenamedKeyWarning

    with pytest.warns(RenamedKeyWarning, match=r"'aikd\.disc_lr' is now 'aikd\.critic_lr'"):
        cfg = load_config(None, ["method=aikd", "aikd.disc_lr=0.0003"])
    assert cfg.hparams.critic_lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match=r"'aikd\.prev' and 'aikd\.previous' are one setting"):
        load_config(None, ["method=aikd", "aikd.prev=buffer", "aikd.previous=snapshot"])


def test_a_saved_config_with_the_old_names_is_read_without_a_warning():
    import warnings

    from aikd.config import from_saved, normalized

    saved = {"method": "aikd", "aikd": {"prev": "snapshot", "disc_norm": "layer"}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        section = normalized(saved)["aikd"]
        cfg = from_saved(saved)
    assert section["previous"] == cfg.hparams.previous == "snapshot"
    assert section["critic_norm"] == cfg.hparams.critic_norm == "layer"
    assert "prev" not in section and "disc_norm" not in section


def test_a_command_is_one_registered_function(monkeypatch, capsys):
    """@command adds a sub-command with its arguments, help and handler; nothing else is edited."""
    from aikd import cli

    monkeypatch.setattr(cli, "_COMMANDS", dict(cli._COMMANDS))  # the real registry is left as it was

    @cli.command("hello", help="say hello", description="Say hello to NAME.", example="aikd hello -n you",
                 arguments=(cli.arg("-n", "--name", required=True, help="whom to greet"),), overrides="overrides")
    def cmd_hello(args) -> int:
        print(f"hello {args.name} {args.overrides} {args.quiet}")
        return 3

    assert cli.main(["hello", "-n", "you", "seed=1", "-q"]) == 3
    assert capsys.readouterr().out == "hello you ['seed=1'] True\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "say hello" in capsys.readouterr().out
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("hello", help="", description="", example="")(cmd_hello)


def test_output_settings_are_replaced_only_where_given_and_silent_off_rank_zero():
    from aikd.engine.output import SILENT, Output

    said: list[str] = []
    output = Output(log=said.append)
    assert output.with_() is output and output.with_(quiet=True) == Output(quiet=True, log=said.append)
    assert output.for_rank(True) is output and output.for_rank(False) is SILENT
    SILENT.log("nothing")
    output.log("something")
    assert said == ["something"] and Output.on_stderr(quiet=True) is SILENT
