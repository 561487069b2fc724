"""The optional PNG plots of the CLI (``--plot``): matplotlib found or one clear error, a headless
backend, and one way to write the file."""
from __future__ import annotations

from mpq.errors import OutputError


def require_matplotlib():
    """The matplotlib module; OutputError (one line, with the pip command) when it is missing."""
    try:
        import matplotlib
        return matplotlib
    except ImportError:
        raise OutputError("--plot needs matplotlib, which is not installed",
                          hint="pip install 'mpq[plot]' (or pip install matplotlib)") from None


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (OutputError when matplotlib is missing)."""
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG at ``path`` and close it; OutputError when it cannot be written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise OutputError(f"cannot write the plot {path}: {exc}") from None
    finally:
        plt.close(fig)
