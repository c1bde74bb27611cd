"""Request bodies parsed and validated in a worker thread, in pieces that each hold the GIL only
briefly, so the event loop keeps answering while a body at the size limit is read.

`json.loads` holds the GIL for its whole run (~15 ms per MB of small numbers) and pydantic for a
whole validation: ~5 µs per item of a list of models, over a second for the 280k one-letter
messages that fit in 8 MiB. So lists of models (`messages`) are validated an item at a time
first, and the request model then takes the validated items at once.
"""
from __future__ import annotations

import json
import re
import types
import typing
from collections import deque

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from vllm_jax.sampling_params import ParamError, check_text
from vllm_jax.server.protocol import APIError
from vllm_jax.server.rendering import off_loop

SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # in strict UTF-8, only escapes spell them


def json_body(model: type[BaseModel]):
    """A route parameter's default: the request body as `model`."""
    async def parse(request: Request):
        return await off_loop(validate_body, model, await request.body())

    return Depends(parse)


def validate_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        data = json.loads(body.decode("utf-8"))  # strict: bytes would pass raw surrogates
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
            "msg": "JSON decode error", "input": {}, "ctx": {"error": str(e)}}]) from None
    if SURROGATE_ESCAPE.search(body):
        _check_text(data)
    if isinstance(data, dict):
        data = {name: _validated_items(model, name, value) for name, value in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _body_error(e) from None


def _check_text(data):
    """Every string of the body, keys and unknown fields too, must be valid Unicode: JSON escapes
    can spell lone surrogates, which no tokenizer or encoder accepts (400 naming the field)."""
    for path, text in _strings(data):
        try:
            check_text(path, text)
        except ParamError as e:
            raise APIError(str(e), param=path.split(".")[0]) from None


def _strings(data):
    """(dotted path, string) for every string in parsed JSON, dict keys included; a loop, not
    recursion, so that no nesting depth can overflow the stack."""
    todo = deque([("", data)])
    while todo:
        path, value = todo.popleft()
        if isinstance(value, str):
            yield path or "body", value
        elif isinstance(value, dict):
            for k, v in value.items():
                shown = str(k).encode("utf-8", "backslashreplace").decode()  # keys may be bad
                key = f"{path}.{shown}" if path else shown
                todo += [(key, k), (key, v)]
        elif isinstance(value, list):
            todo += [(f"{path}.{i}", v) for i, v in enumerate(value)
                     if isinstance(v, (str, dict, list))]  # token id lists go by fast


def _validated_items(model: type[BaseModel], name: str, value):
    field = model.model_fields.get(name)
    item_model = _list_item_model(field.annotation) if field else None
    if item_model is None or not isinstance(value, list):
        return value
    items = []
    for i, item in enumerate(value):
        try:
            items.append(item_model.model_validate(item))
        except ValidationError as e:
            raise _body_error(e, (name, i)) from None
    return items


def _list_item_model(annotation) -> type[BaseModel] | None:
    """M for `list[M]` or `list[M] | None` where M is a pydantic model, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        lists = [_list_item_model(a) for a in typing.get_args(annotation)]
        return next((m for m in lists if m is not None), None)
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and isinstance(args[0], type) \
            and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _body_error(e: ValidationError, prefix: tuple = ()) -> RequestValidationError:
    return RequestValidationError([{**err, "loc": ("body", *prefix, *err["loc"])}
                                   for err in e.errors(include_url=False)])
