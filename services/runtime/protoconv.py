"""Conversions between the plain-Python storage refs and their protobuf twin."""

from __future__ import annotations

from cmrvl.v1 import common_pb2
from services.runtime.storage import Ref


def ref_to_proto(ref: Ref) -> common_pb2.ObjectRef:
    return common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key, sha256=ref.sha256, size_bytes=ref.size_bytes)


def ref_from_proto(message: common_pb2.ObjectRef) -> Ref:
    return Ref(message.bucket, message.key, message.sha256, message.size_bytes)
