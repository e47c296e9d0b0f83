"""Protocol buffer definitions (a leaf package: depends on nothing in the project)."""
