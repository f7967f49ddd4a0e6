"""Example fetchers for eagercache."""
