import json

import pytest

from workbench.config import (PARTITION_SCHEMES, ExperimentConfig, PartitionConfig, knobs, parse_override,
                              read_config_file, resolve_partition_scheme)


def test_every_knob_has_description_and_range_and_a_valid_default():
    config = ExperimentConfig()
    flat = config.to_flat()
    for k in knobs():
        assert k.help and k.describe_range()
        assert flat[k.key] == k.default
        assert k.check(k.default) == k.default


def test_issue_keys_exist():
    keys = {k.key for k in knobs()}
    required = {
        "seed", "device", "data.name", "data.root", "data.alpha", "data.beta", "model.name",
        "partition.scheme", "partition.alpha", "partition.shards_per_client", "partition.min_size",
        "federation.num_clients", "federation.clients_per_round", "federation.rounds",
        "federation.straggler_fraction", "training.local_epochs", "training.batch_size", "training.lr",
        "strategy.name", "strategy.mu", "evaluation.every",
    }
    assert required <= keys


def test_flat_round_trip():
    config = ExperimentConfig().with_overrides({"training.lr": 0.3, "partition.scheme": "dirichlet", "seed": 7})
    assert ExperimentConfig.from_dict(config.to_flat()) == config
    assert ExperimentConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("key, value, words", [
    ("partition.alpha", -0.5, ["partition.alpha", "-0.5", "> 0", "try 0.1-1.0"]),
    ("training.lr", 0, ["training.lr", "> 0"]),
    ("training.lr", "fast", ["training.lr", "float", "'fast'"]),
    ("strategy.name", "fedprx", ["strategy.name", "fedprx", "did you mean 'fedprox'"]),
    ("federation.straggler_fraction", 1.5, ["federation.straggler_fraction", "1.5", "<= 1.0"]),
    ("federation.clients_per_round", 0, ["federation.clients_per_round", ">= 1"]),
    ("device", "tpu", ["device", "tpu", "auto, cpu, cuda"]),
    ("federation.rounds", 2.5, ["federation.rounds", "int"]),
    ("training.batch_size", True, ["training.batch_size", "int"]),
])
def test_bad_values_name_field_value_and_rule(key, value, words):
    with pytest.raises((ValueError, TypeError)) as info:
        ExperimentConfig().with_overrides({key: value})
    for word in words:
        assert word in str(info.value)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="clients_per_round must be <= federation.num_clients"):
        ExperimentConfig().with_overrides({"federation.num_clients": 5, "federation.clients_per_round": 6})
    with pytest.raises(ValueError, match="straggler_fraction=0.5 needs training.local_epochs >= 2"):
        ExperimentConfig().with_overrides({"federation.straggler_fraction": 0.5, "training.local_epochs": 1})


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'training.lr'"):
        ExperimentConfig().with_overrides({"training.lrr": 0.1})


def test_strings_are_parsed_by_type():
    config = ExperimentConfig().with_overrides({"training.lr": "0.05", "federation.rounds": "7"})
    assert config.training.lr == 0.05 and config.federation.rounds == 7


def test_yaml_and_json_files(tmp_path):
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text("seed: 3\ntraining:\n  lr: 0.1\npartition.scheme: iid\n")
    config = ExperimentConfig.from_file(yaml_file)
    assert (config.seed, config.training.lr, config.partition.scheme) == (3, 0.1, "iid")
    json_file = tmp_path / "exp.json"
    json_file.write_text(json.dumps({"strategy": {"name": "fedprox", "mu": 0.01}}))
    assert ExperimentConfig.from_file(json_file).strategy.mu == 0.01


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        ExperimentConfig.from_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ExperimentConfig.from_file(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        ExperimentConfig.from_file(listed)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("partition:\n  alpha: -1\n")
    with pytest.raises(ValueError, match="partition.alpha must be > 0"):
        ExperimentConfig.from_file(wrong)


def test_parse_override():
    assert parse_override("training.lr=0.1") == ("training.lr", "0.1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("training.lr")


def test_parse_override_names_the_flag_it_was_given_after():
    with pytest.raises(ValueError) as info:
        parse_override("training.lr")
    assert str(info.value) == "--set expects KEY=VALUE, got 'training.lr' (for example --set training.lr=0.05)"
    with pytest.raises(ValueError) as info:
        parse_override("=0.1", "--grid", form="KEY=V1,V2", example="training.lr=0.01,0.1")
    assert str(info.value) == "--grid expects KEY=V1,V2, got '=0.1' (for example --grid training.lr=0.01,0.1)"


#: The article and type name every knob type's message must read with (written out, not derived).
TYPE_WORDS = {int: "must be an int", float: "must be a float", bool: "must be a bool", str: "must be a str"}


@pytest.mark.parametrize("knob", knobs(), ids=lambda k: k.key)
def test_every_type_error_reads_right(knob):
    """'must be a int' was the message; each knob, given a value of no use, names its type with the right
    article, the field and the value, and shows how to write one."""
    wrong = 3 if knob.type is str else "not-a-value"
    with pytest.raises(TypeError) as info:
        knob.check(wrong)
    message = str(info.value)
    assert message.startswith(f"{knob.key} {TYPE_WORDS[knob.type]} ")
    assert repr(wrong) in message and f"write it like {knob.default!r}" in message
    assert " a int" not in message and " a integer" not in message


def test_other_type_messages_read_right(tmp_path):
    with pytest.raises(TypeError) as info:
        ExperimentConfig(data={"name": "digits"})
    assert str(info.value).startswith("data must be a DataConfig, got a dict (")
    number = tmp_path / "number.yaml"
    number.write_text("3\n")
    with pytest.raises(ValueError, match=r"must hold a mapping of keys to values, got an int$"):
        read_config_file(number)


@pytest.mark.parametrize("scheme", ["auto", *PARTITION_SCHEMES])
def test_auto_partition_is_natural_with_real_clients_and_iid_without(scheme):
    expected = {True: "natural", False: "iid"} if scheme == "auto" else {True: scheme, False: scheme}
    for has_clients in (True, False):
        assert resolve_partition_scheme(scheme, has_clients) == expected[has_clients]


def test_resolving_a_chosen_scheme_changes_nothing():
    config = ExperimentConfig().with_overrides({"partition.scheme": "dirichlet", "partition.alpha": 0.3})
    for has_clients in (True, False):
        assert config.with_resolved_partition(has_clients) is config
        assert PartitionConfig(scheme="shards").resolved(has_clients) == PartitionConfig(scheme="shards")


def test_config_is_immutable():
    config = ExperimentConfig()
    with pytest.raises(AttributeError):
        config.seed = 3


def test_the_default_partition_works_for_every_dataset():
    """`partition.scheme=natural` by default failed for data without real clients (digits, mnist1d, ...):
    the default is `auto`, natural where the data has clients, else iid."""
    config = ExperimentConfig()
    assert config.partition.scheme == "auto" and "auto" in PARTITION_SCHEMES
    assert config.with_resolved_partition(True).partition.scheme == "natural"
    assert config.with_resolved_partition(False).partition.scheme == "iid"
    assert config.with_resolved_partition(False).partition == PartitionConfig(scheme="iid")
