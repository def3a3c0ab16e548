"""Capabilities for defenders: ``finetune`` (targeted fine-tuning through located components) and
``tampering`` (the attacks the integrity monitor is evaluated against)."""
