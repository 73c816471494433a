"""Teacher backends (HF transformers, vLLM) behind one interface; see :mod:`.base`.

Imports only ``pipeline``'s top-level helpers and the engines; never the dump run, training or eval.
"""

from pipeline.dump.teachers.base import (
    BackendError,
    TeacherBackend,
    TeacherSettings,
    check_teacher_path,
    make_backend,
    package_version,
)

__all__ = ["BackendError", "TeacherBackend", "TeacherSettings", "check_teacher_path", "make_backend",
           "package_version"]
