// A minimal ext_proc server in Go: the floor of what any endpoint picker costs Envoy and
// the machine, for bench/picker_overhead.py's "floor" gateway.
//
// It does no routing work: it answers each request-headers message with one prebuilt
// answer and each request-body message with the next of a few prebuilt answers (serialized
// by the benchmark from the picker's own answer builders, so Envoy applies the same header
// mutation and metadata), in turn. Access log streams are read and dropped. Messages are
// handled as raw bytes: only the tag of the first field is read, to tell which phase a
// ProcessingRequest carries.
package main

import (
	"encoding/hex"
	"errors"
	"flag"
	"io"
	"log"
	"net"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc"
)

// ProcessingRequest's oneof field numbers (envoy/service/ext_proc/v3/external_processor.proto).
const (
	requestHeadersField  = 2
	responseHeadersField = 3
	requestBodyField     = 4
)

// ProcessingResponse{response_headers: HeadersResponse{}}: "continue" for the response phase.
var continueResponseHeaders = []byte{0x12, 0x00}

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}

func (rawCodec) String() string { return "proto" }

type answers struct {
	headers []byte
	bodies  [][]byte
	next    uint64
}

// firstField reads the field number of a protobuf message's first tag (a varint).
func firstField(message []byte) uint64 {
	var tag uint64
	for shift, i := uint(0), 0; i < len(message) && shift < 64; shift, i = shift+7, i+1 {
		tag |= uint64(message[i]&0x7f) << shift
		if message[i] < 0x80 {
			return tag >> 3
		}
	}
	return 0
}

func (a *answers) process(_ interface{}, stream grpc.ServerStream) error {
	for {
		var message []byte
		if err := stream.RecvMsg(&message); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		var answer []byte
		switch firstField(message) {
		case requestHeadersField:
			answer = a.headers
		case requestBodyField:
			answer = a.bodies[atomic.AddUint64(&a.next, 1)%uint64(len(a.bodies))]
		case responseHeadersField:
			answer = continueResponseHeaders
		default:
			continue
		}
		if err := stream.SendMsg(&answer); err != nil {
			return err
		}
	}
}

func dropAccessLogs(_ interface{}, stream grpc.ServerStream) error {
	for {
		var entry []byte
		if err := stream.RecvMsg(&entry); err != nil {
			if errors.Is(err, io.EOF) {
				empty := []byte{}
				return stream.SendMsg(&empty)
			}
			return err
		}
	}
}

func decode(text string) []byte {
	data, err := hex.DecodeString(text)
	if err != nil {
		log.Fatalf("an answer is not hex: %v", err)
	}
	return data
}

func main() {
	listen := flag.String("listen", "127.0.0.1:9002", "address to serve ext_proc on")
	headers := flag.String("headers-answer", "0a00", "hex ProcessingResponse for request headers")
	bodies := flag.String("body-answers", "", "hex ProcessingResponses for request bodies, comma separated, used in turn")
	flag.Parse()
	if *bodies == "" {
		log.Fatal("--body-answers is required: one routing answer per endpoint")
	}
	a := &answers{headers: decode(*headers)}
	for _, text := range strings.Split(*bodies, ",") {
		a.bodies = append(a.bodies, decode(text))
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	server := grpc.NewServer(grpc.CustomCodec(rawCodec{}))
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "envoy.service.ext_proc.v3.ExternalProcessor",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{
			StreamName: "Process", Handler: a.process, ServerStreams: true, ClientStreams: true,
		}},
	}, a)
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "envoy.service.accesslog.v3.AccessLogService",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{
			StreamName: "StreamAccessLogs", Handler: dropAccessLogs, ClientStreams: true,
		}},
	}, a)
	log.Printf("serving on %s", listener.Addr())
	log.Fatal(server.Serve(listener))
}
