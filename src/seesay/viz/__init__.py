"""seesay.viz"""
