"""seesay.data"""
