"""Merge methods: one file each, registered with :func:`mergesmith.methods.base.register`."""
from .base import MergeError, MethodSpec, Param, Params, TensorContext, get_method, list_methods, register

__all__ = ["MergeError", "MethodSpec", "Param", "Params", "TensorContext", "get_method", "list_methods", "register"]
