from pathlib import Path

__version__ = "0.1.0"


def _refuse_stale_compiled() -> None:
    """The data plane's hot modules may be compiled (`make compile`, mypyc): a module
    compiled from an older source would run old code silently, so refuse to start
    instead; `make compile` rebuilds, `make clean-compiled` goes back to the sources."""
    here = Path(__file__).parent
    for built in here.rglob("*.so"):
        source = built.with_name(built.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            raise ImportError(
                f"{built} was compiled from an older {source.name}: run `make compile` "
                "(or `make clean-compiled` to run from the Python sources)"
            )


_refuse_stale_compiled()
