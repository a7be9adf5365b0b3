"""seesay.layers"""
