"""seesay.metrics"""
