# mitmproxy addon: the same header every peer injects.
def request(flow):
    flow.request.headers["Authorization"] = "Bearer @TOKEN@"
