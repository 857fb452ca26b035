"""The serve options are defined once (raykd.serve.options): the flags of ``raykd serve`` are made
from ServeArgs and ServerOptions, and the request limits default to ServeArgs'. No Ray here."""

from __future__ import annotations

from raykd.serve.__main__ import NOT_FLAGS, args_to_serve_args, parse_args, server_options
from raykd.serve.intake import Limits
from raykd.serve.options import ServeArgs, ServerOptions


def test_the_cli_defaults_are_the_models_defaults():
    ns = parse_args(["--family", "f.json"])
    assert args_to_serve_args(ns) == ServeArgs(family="f.json")
    assert server_options(ns) == ServerOptions()
    assert args_to_serve_args(parse_args(["--model", "a", "--model", "b=c"])) == ServeArgs(models=["a", "b=c"])


def test_every_field_but_the_config_only_ones_is_a_flag():
    dests = set(vars(parse_args(["--family", "f.json"])))
    assert dests == (set(ServeArgs.model_fields) - set(NOT_FLAGS)) | set(ServerOptions.model_fields)


def test_the_request_limits_default_to_the_serve_args():
    args = ServeArgs(family="f.json")
    assert Limits() == Limits(args.max_body_bytes, args.max_image_pixels)
