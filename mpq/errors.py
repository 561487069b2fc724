"""One error hierarchy for the library; the CLI maps each class to an exit code.

Every message says what went wrong, where (file, YAML path, layer name) and how to fix it.
"""
from __future__ import annotations


class MpqError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class OptionError(MpqError):
    """A command-line option's value does not fit the inputs it was given (found once they are
    read, e.g. an eval --window beyond the model's positions); click reports the other usage
    errors itself.  Exit code 2, as for any usage error."""

    exit_code = 2


class RecipeError(MpqError):
    """A recipe is malformed, or its plan leaves too much of the model unquantized.

    Malformed: unknown key, bad value, rule matching nothing.  Too much: more of the weight
    bytes than --max-unquantized / --strict allows (mpq.models.coverage)."""

    exit_code = 3


class ModelError(MpqError):
    """The source model is missing, unreadable, corrupt or of an unsupported architecture."""

    exit_code = 4


class CalibrationError(MpqError):
    """Calibration data is missing, empty, unreadable or too short."""

    exit_code = 5


class OutputError(MpqError):
    """The output path exists (without --force) or cannot be written."""

    exit_code = 6


class ArtifactError(MpqError):
    """An mpq artifact is unreadable: unknown format version, missing tensor, shape mismatch."""

    exit_code = 7


class SchemeError(MpqError):
    """A quantization scheme cannot be applied to a tensor (e.g. group size does not divide K)."""

    exit_code = 8


class FormatError(MpqError):
    """The chosen output format cannot express the plan (which layers, why), or --strict
    pre-flight checks for the target runtime failed."""

    exit_code = 9


class EvalGateError(MpqError):
    """An evaluation gate (eval --max-ppl-delta / --max-kl, drift --max-clipped) was exceeded."""

    exit_code = 10


class ResourceError(MpqError):
    """The run would not fit: estimated peak memory exceeds what is available."""

    exit_code = 11


class ResumeError(MpqError):
    """A work directory beside the output belongs to a different run (model, recipe,
    calibration, options or mpq version changed), or --resume found nothing to resume."""

    exit_code = 12


class PrecisionPolicyError(MpqError):
    """The recorded or proposed precision policy is unsafe for the observed activation ranges
    (mpq validate: a part's dtype overflows)."""

    exit_code = 13


class Interrupted(MpqError):
    """Stopped by SIGINT/SIGTERM at a safe point; the finished blocks are kept for --resume."""

    exit_code = 130

    def __init__(self, message: str, *, signal_number: int = 2, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.exit_code = 128 + signal_number


EXIT_CODES = {
    0: "success",
    1: "internal error (a bug: please report it with the traceback from --debug)",
    2: "command-line usage error",
    **{cls.exit_code: cls.__doc__.strip().splitlines()[0] for cls in
       (RecipeError, ModelError, CalibrationError, OutputError, ArtifactError, SchemeError,
        FormatError, EvalGateError, ResourceError, ResumeError, PrecisionPolicyError)},
    130: "interrupted by SIGINT (Ctrl-C); finished blocks are kept, rerun to resume",
    143: "interrupted by SIGTERM; finished blocks are kept, rerun to resume",
}


def did_you_mean(word: str, choices) -> str | None:
    """A 'did you mean X?' hint for a misspelt key or name, or None."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text (library errors can run to paragraphs)."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def corrupt_weights(path, exc: BaseException) -> ModelError:
    """The one error for weight files of ``path`` that cannot be read (raise it ``from exc``)."""
    return ModelError(f"{path}: weight files are unreadable or corrupt: {first_line(exc)}",
                      hint="re-download or re-save the model")
