"""``python -m ah_followerd`` runs the ``ah-followerd`` CLI."""

from ah_followerd.cli import main

if __name__ == "__main__":
    main(prog_name="ah-followerd")
