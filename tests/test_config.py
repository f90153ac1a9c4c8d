from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from look.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_override,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    values = to_dict(RunConfig())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    assert to_dict(load_config(path)) == values


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(recipe: Path) -> None:
    from look.methods import get_method_class

    cfg = load_config(recipe)
    get_method_class(cfg.method["name"]).parse_options(cfg.method)


def test_overrides_parse_yaml_values() -> None:
    assert parse_override("optim.lr=0.05") == (["optim", "lr"], 0.05)
    assert parse_override("method.k=null") == (["method", "k"], None)
    assert parse_override("train.tensorboard=false") == (["train", "tensorboard"], False)
    cfg = load_config(None, ["optim.lr=0.05", "method.k=7", "data.subset=100"])
    assert cfg.optim.lr == 0.05 and cfg.method["k"] == 7 and cfg.data.subset == 100


@pytest.mark.parametrize(
    ("spelled", "stored"), [("false", "false"), ("true", "true"), ("auto", "auto")]
)
def test_channels_last_takes_yaml_booleans(spelled: str, stored: str) -> None:
    # YAML reads `false` as a boolean; the field's choices spell it as a string.
    assert load_config(None, [f"train.channels_last={spelled}"]).train.channels_last == stored


def test_a_boolean_for_a_string_field_without_true_false_choices_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train.amp must be one of \['auto', 'none'"):
        load_config(None, ["train.amp=false"])
    with pytest.raises(ConfigError, match=r"got True \(YAML reads yes/no/on/off as true/false"):
        load_config(None, ["train.amp=yes"])
    # A free string field says it too: `data.augment=no` once read "must be a string, got False".
    with pytest.raises(ConfigError, match=r"got False \(YAML reads yes/no/on/off as true/false"):
        load_config(None, ["data.labels=no"])


def test_int_is_accepted_for_float_fields() -> None:
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "did you mean 'lr'"),
        # No near miss: the section's keys are listed instead.
        (
            "model.name=resnet18",
            "valid keys here: backbone, backbone_kwargs, pretrained_weights, small_stem.",
        ),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=abc", "optim.lr must be a number"),
        ("optim.lr=.nan", "finite"),
        ("optim.batch_size=0", "optim.batch_size must be > 0"),
        ("optim.name=adam", "optim.name='adam' is not one of"),
        ("train.amp=fp8", "train.amp"),
        ("optim.warmup_epochs=50", "exceeds optim.epochs"),
        ("data.subset=0", "data.subset must be > 0"),
        ("method=look", "must be a mapping"),
        ("train.tensorboard=maybe", "true or false"),
    ],
)
def test_bad_values_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message.lower() in str(info.value).lower()


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        apply_overrides({}, ["optim.lr"])


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_recipe_method_section_replaces_default(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: ce}\n")
    assert load_config(path).method == {"name": "ce"}


_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(["data", "model", "optim", "train"]),
    key=st.sampled_from(
        [
            "lr",
            "batch_size",
            "epochs",
            "dataset",
            "backbone",
            "amp",
            "subset",
            "grad_clip",
            "num_workers",
            "max_steps",
            "nonsense",
            "warmup_epochs",
            "tensorboard",
        ]
    ),
    value=_scalar,
)
def test_random_bad_values_raise_config_error_or_validate(
    section: str, key: str, value: object
) -> None:
    """Fuzz: any value either validates into a typed config or raises ConfigError — never
    anything else (no TypeError deep inside, no silently accepted garbage type)."""
    values = to_dict(RunConfig())
    values[section][key] = value
    try:
        cfg = config_from_dict(values)
    except ConfigError:
        return
    resolved = to_dict(cfg)[section][key]
    default = to_dict(RunConfig())[section].get(key, object())
    if default is not None and value is not None and not isinstance(default, bool):
        assert type(resolved) is type(default) or isinstance(resolved, type(default))


def test_exponent_without_dot_is_a_float() -> None:
    # YAML 1.1 reads 1e-4 as a string; a learning rate written that way must still work.
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(
        [
            "optim.lr",
            "optim.batch_size",
            "data.dataset",
            "train.amp",
            "method.k",
            "seed",
            "data.subset",
            "train.max_steps",
            "optim.grad_clip",
            "model.small_stem",
            "bogus.key",
            "optim",
            "data.labels",
            "train.nan_policy",
        ]
    ),
    raw=st.text(max_size=12),
)
def test_random_set_overrides_give_a_config_or_a_config_error(key: str, raw: str) -> None:
    """Fuzz the `--set key=value` path exactly as the CLI feeds it: any text either becomes a
    validated config or a ConfigError naming the problem, never another exception."""
    try:
        cfg = load_config(None, [f"{key}={raw}"])
    except ConfigError as exc:
        assert str(exc)
        return
    assert isinstance(cfg, RunConfig)


def test_a_k_set_on_a_recipe_with_k_fraction_is_refused_even_the_default_one(
    tmp_path: Path,
) -> None:
    recipe = tmp_path / "recipe.yaml"
    # What a run's saved config.yaml holds: the default k next to k_fraction. It loads.
    recipe.write_text("method: {name: look, k: 200, k_fraction: 0.5}\n", encoding="utf-8")
    assert load_config(recipe).method["k_fraction"] == 0.5
    for overrides in (["method.k=200"], ["method={name: look, k: 200, k_fraction: 0.5}"]):
        with pytest.raises(ConfigError, match=r"k or k_fraction, not both \(k=200 from --set"):
            load_config(recipe, overrides)
    # Either one set to null first, and the other applies.
    assert load_config(recipe, ["method.k=200", "method.k_fraction=null"]).method["k"] == 200
    assert load_config(recipe, ["method.k=null"]).method["k_fraction"] == 0.5


def test_a_mapping_merges_into_a_section_but_replaces_the_method() -> None:
    recipe = ["optim.batch_size=1024", "method.k=7", "method.temperature=0.2"]
    merged = load_config(None, [*recipe, "optim={lr: 0.05}"])
    assert merged.optim.lr == 0.05 and merged.optim.batch_size == 1024  # the recipe's stays
    replaced = load_config(None, [*recipe, "method={name: look, k: 9}"])
    assert replaced.method == {"name": "look", "k": 9}  # the method's options are its own


def test_yaml_and_list_errors_are_one_line_that_says_where_and_how(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("method:\n  k: [5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(broken, [])
    assert "\n" not in str(caught.value) and "at line 3, column 1" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["method.k=[1"])
    assert "\n" not in str(caught.value) and "at line 1, column 3" in str(caught.value)
    with pytest.raises(
        ConfigError, match=r"got 'SIGTERM' \(e\.g\. --set train\.stop_signals=\[SIGTERM\]\)"
    ):
        load_config(None, ["train.stop_signals=SIGTERM"])


def test_knn_monitor_labels_are_checked_with_the_monitor_off() -> None:
    with pytest.raises(ConfigError, match="knn_monitor_labels must be fine, coarse or a grouping"):
        load_config(None, ["train.knn_monitor_labels=bogus"])
    assert load_config(None, ["train.knn_monitor_labels=groups.json"]).train.knn_monitor_labels


@pytest.mark.parametrize(
    "text", ["data.root=batch #3", "data.labels=groups #2.json", "optim.lr=0.1 # a note"]
)
def test_a_value_cut_short_by_a_yaml_comment_is_refused_with_the_quoting(text: str) -> None:
    # `--set "data.root=batch #3"` trained on the folder `batch`, without a word.
    key, _, raw = text.partition("=")
    with pytest.raises(
        ConfigError, match=f"quote the value to keep its '#': --set '{key}=\"{raw}\"'"
    ):
        parse_override(text)


def test_a_mapping_cut_short_by_a_comment_is_told_to_drop_it() -> None:
    with pytest.raises(ConfigError, match="drop the comment, or quote the text inside"):
        parse_override("optim={lr: 0.05, epochs: 20} # x")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('data.root="batch #3"', "batch #3"),
        ("data.root='batch #3'", "batch #3"),
        ("data.root=batch#3", "batch#3"),  # (no space before it: no comment)
    ],
)
def test_a_hash_that_is_no_comment_is_kept(text: str, value: str) -> None:
    assert parse_override(text)[1] == value


def test_recipes_are_found_by_name_from_any_folder_and_by_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from look.config import load_config, resolve_recipe

    monkeypatch.chdir(tmp_path)  # not the repository: its configs/ is not the working folder's
    found = resolve_recipe("configs/look_cnn-small_fmnist-coarse.yaml")  # as `look --help` spelt it
    assert found.name == "look_cnn-small_fmnist-coarse.yaml" and found.is_absolute()
    assert load_config("look_cnn-small_fmnist-coarse").method["name"] == "look"


def test_recipes_installed_under_any_install_scheme_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pip puts data files under the scheme's data folder: /usr/local on Debian, ~/.local with
    # --user, DIR with --target or --prefix; only sys.prefix was looked in.
    import sysconfig

    from look.config import resolve_recipe

    recipes = tmp_path / "usr-local" / "share" / "look" / "configs"
    recipes.mkdir(parents=True)
    (recipes / "company_recipe.yaml").write_text("optim: {epochs: 3}\n")
    scheme = sysconfig.get_scheme_names()[0]
    original = sysconfig.get_path
    monkeypatch.setattr(
        sysconfig,
        "get_path",
        lambda name, scheme_name=None, *a, **k: (
            str(tmp_path / "usr-local")
            if (name, scheme_name) == ("data", scheme)
            else original(name, scheme_name, *a, **k)
        ),
    )
    assert resolve_recipe("company_recipe") == (recipes / "company_recipe.yaml").resolve()
    with pytest.raises(FileNotFoundError, match=r"'no_such_recipe' does not exist.*company_recipe"):
        resolve_recipe("no_such_recipe")
