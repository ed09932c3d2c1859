"""Tests of the etcd backend against real etcd members."""
