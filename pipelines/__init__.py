"""synpref library: one subpackage per step of the curation process (docs/architecture.md)."""
