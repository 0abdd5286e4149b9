"""The paper run rehearsed offline: loopback servers, tiny same-class stand-ins, `make paper` (see __main__)."""
