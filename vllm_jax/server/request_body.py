"""Request bodies parsed and validated in a worker thread, in pieces that each hold the GIL only
briefly, so the event loop keeps answering while a body at the size limit is read.

`json.loads` holds the GIL for its whole run (~15 ms per MB of small numbers) and pydantic for a
whole validation: ~5 µs per item of a list of models, over a second for the 280k one-letter
messages that fit in 8 MiB. So lists of models (`messages`) are validated an item at a time
first, and the request model then takes the validated items at once.
"""
from __future__ import annotations

import json
import types
import typing

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from vllm_jax.server.rendering import off_loop


def json_body(model: type[BaseModel]):
    """A route parameter's default: the request body as `model`."""
    async def parse(request: Request):
        return await off_loop(validate_body, model, await request.body())

    return Depends(parse)


def validate_body(model: type[BaseModel], body: bytes) -> BaseModel:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestValidationError([{
            "type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
            "msg": "JSON decode error", "input": {}, "ctx": {"error": str(e)}}]) from None
    if isinstance(data, dict):
        data = {name: _validated_items(model, name, value) for name, value in data.items()}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _body_error(e) from None


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
