"""The `qwen3repro` command line (placeholder while the foundation lands)."""
import click


@click.group()
def main() -> None:
    """qwen3repro: the Qwen3 pipeline at tiny and full scale."""


if __name__ == "__main__":
    main()
