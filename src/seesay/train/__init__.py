"""seesay.train"""
