// Command fakeagent runs the FAKE agent (package fakeagent) as a process, for tests that run
// `stasis webhook --agent-endpoint …` against a real API server where no CRIU can run. It dumps
// nothing: every checkpoint follows the script given by the flags.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/stasis-k8s/stasis/tests/fakeagent"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:9443", "address")
	node := flag.String("node", "node-1", "node name reported in statuses")
	polls := flag.Int("polls", 0, "status polls answered Running before the end (negative: never ends)")
	bytes := flag.Int64("bytes", 1<<20, "progress bytes reported")
	fail := flag.String("fail", "", "end every checkpoint as Failed with this message")
	cert := flag.String("tls-cert-file", "", "serving certificate (empty: plain HTTP)")
	key := flag.String("tls-key-file", "", "serving key")
	clientCA := flag.String("client-ca-file", "", "require client certificates signed by this CA")
	flag.Parse()

	a := fakeagent.New(*node)
	a.SetDefault(fakeagent.Script{Polls: *polls, Bytes: *bytes, Fail: *fail})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakeagent:", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: a, ReadHeaderTimeout: 5 * time.Second}
	fmt.Printf("fakeagent (FAKE, dumps nothing) listening on %s\n", ln.Addr())
	if *cert == "" {
		err = srv.Serve(ln)
	} else {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if *clientCA != "" {
			pem, err := os.ReadFile(*clientCA)
			if err != nil {
				fmt.Fprintln(os.Stderr, "fakeagent:", err)
				os.Exit(1)
			}
			pool := x509.NewCertPool()
			pool.AppendCertsFromPEM(pem)
			tc.ClientCAs, tc.ClientAuth = pool, tls.RequireAndVerifyClientCert
		}
		srv.TLSConfig = tc
		err = srv.ServeTLS(ln, *cert, *key)
	}
	fmt.Fprintln(os.Stderr, "fakeagent:", err)
	os.Exit(1)
}
