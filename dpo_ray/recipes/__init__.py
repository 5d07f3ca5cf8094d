"""End-to-end experiments built from the stages (data -> reference -> train -> eval)."""
