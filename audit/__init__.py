"""Attacks and audits that back every privacy sentence: item inference, canary lower bounds on epsilon,
sum recovery under SecAgg+, the clipping bound measured, poisoning."""
