"""``python -m ah_access_pointd`` runs the ``ah-access-pointd`` CLI."""

from ah_access_pointd.cli import main

if __name__ == "__main__":
    main(prog_name="ah-access-pointd")
