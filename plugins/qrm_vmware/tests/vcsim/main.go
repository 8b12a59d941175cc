// qrm's vcsim launcher: a vSphere API simulator for qrm-vmware's tests and
// benchmarks, built from the govmomi "simulator" library that Debian ships
// (golang-github-vmware-govmomi-dev). vcsimbuild.py compiles it offline.
//
// It serves one simulated vCenter (or, with -esx, one ESXi host) on a TCP
// address, prints one line
//
//	QRM_VCSIM {"url": "https://127.0.0.1:PORT/sdk", "username": ..., "password": ..., "pid": N}
//
// once it accepts connections, and exits on SIGTERM or SIGINT after removing
// its temporary datastore directories. GET /qrm/soap-calls answers how many
// SOAP requests it served, by method (tests count round trips with it);
// DELETE /qrm/soap-calls sets the counters back to zero. POST
// /qrm/faults?method=M&count=N makes the next N calls of method M fail with
// a SystemError fault, as a vCenter that refuses them would (tests check
// that qrm leaves nothing half-made). POST /qrm/task-delay?task=powerOn&ms=N
// makes every task of that kind run for N ms (0: finish at once again).
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
)

// soapMethod finds the first element inside the SOAP Body: the method called.
var soapMethod = regexp.MustCompile(`<(?:[A-Za-z0-9_]+:)?Body[^>]*>\s*<(?:[A-Za-z0-9_]+:)?([A-Za-z0-9_]+)`)

type callCounter struct {
	mu     sync.Mutex
	counts map[string]int
	total  int
	faults map[string]int
}

const injectedFault = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s refused (fault injected by the test)</faultstring>
<detail><SystemErrorFault xmlns="urn:vim25" xsi:type="SystemError"><reason>fault injected by the test</reason></SystemErrorFault></detail>
</soapenv:Fault></soapenv:Body></soapenv:Envelope>`

func (c *callCounter) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/sdk" {
			body, err := io.ReadAll(r.Body)
			_ = r.Body.Close()
			if err == nil {
				name := "?"
				if m := soapMethod.FindSubmatch(body); m != nil {
					name = string(m[1])
				}
				c.mu.Lock()
				c.counts[name]++
				c.total++
				fail := c.faults[name] > 0
				if fail {
					c.faults[name]--
				}
				c.mu.Unlock()
				if fail {
					w.Header().Set("Content-Type", "text/xml; charset=utf-8")
					w.WriteHeader(http.StatusInternalServerError)
					fmt.Fprintf(w, injectedFault, name)
					return
				}
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		next.ServeHTTP(w, r)
	})
}

func (c *callCounter) serve(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch r.Method {
	case http.MethodGet:
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]interface{}{"total": c.total, "methods": c.counts})
	case http.MethodDelete:
		c.counts = map[string]int{}
		c.total = 0
		w.WriteHeader(http.StatusNoContent)
	default:
		w.WriteHeader(http.StatusMethodNotAllowed)
	}
}

func (c *callCounter) serveFaults(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	method := r.URL.Query().Get("method")
	count, err := strconv.Atoi(r.URL.Query().Get("count"))
	if method == "" || err != nil || count < 0 {
		http.Error(w, "use ?method=NAME&count=N", http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	c.faults[method] = count
	c.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func serveTaskDelay(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	task := r.URL.Query().Get("task")
	ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
	if task == "" || err != nil || ms < 0 {
		http.Error(w, "use ?task=ID&ms=N", http.StatusBadRequest)
		return
	}
	simulator.QrmTaskDelay(task, time.Duration(ms)*time.Millisecond)
	w.WriteHeader(http.StatusNoContent)
}

func main() {
	model := simulator.VPX()

	listen := flag.String("l", "127.0.0.1:0", "address to listen on (port 0: any free port)")
	esx := flag.Bool("esx", false, "simulate a standalone ESXi host instead of a vCenter")
	plain := flag.Bool("http", false, "serve plain HTTP instead of HTTPS")
	certFile := flag.String("cert", "", "PEM certificate to serve (default: Go's self-signed test certificate)")
	keyFile := flag.String("key", "", "PEM private key of -cert")
	user := flag.String("username", "user", "the one user name the simulator accepts")
	pass := flag.String("password", "pass", "its password")
	flag.IntVar(&model.Datacenter, "dc", model.Datacenter, "datacenters")
	flag.IntVar(&model.Cluster, "cluster", model.Cluster, "clusters per datacenter")
	flag.IntVar(&model.ClusterHost, "host", model.ClusterHost, "hosts per cluster")
	flag.IntVar(&model.Host, "standalone-host", model.Host, "standalone hosts per datacenter")
	flag.IntVar(&model.Pool, "pool", model.Pool, "extra resource pools per cluster")
	flag.IntVar(&model.Datastore, "ds", model.Datastore, "datastores")
	flag.IntVar(&model.Machine, "vm", model.Machine, "virtual machines per resource pool (and per standalone host)")
	flag.IntVar(&model.Portgroup, "pg", model.Portgroup, "distributed port groups per datacenter")
	flag.IntVar(&model.Folder, "folder", model.Folder, "extra folders per datacenter")
	flag.BoolVar(&model.Autostart, "autostart", true, "power the model's virtual machines on")
	flag.IntVar(&model.DelayConfig.Delay, "delay", 0, "milliseconds of delay before each SOAP answer (network latency)")
	flag.Parse()

	if *esx {
		host := simulator.ESX()
		host.Datastore, host.Machine, host.Autostart = model.Datastore, model.Machine, model.Autostart
		host.DelayConfig = model.DelayConfig
		model = host
	}
	if err := model.Create(); err != nil {
		log.Fatalf("vcsim: cannot create the inventory: %v", err)
	}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	if !*plain {
		config := new(tls.Config)
		if *certFile != "" {
			cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
			if err != nil {
				log.Fatalf("vcsim: -cert/-key: %v", err)
			}
			config.Certificates = []tls.Certificate{cert}
		}
		model.Service.TLS = config
	}

	counter := &callCounter{counts: map[string]int{}, faults: map[string]int{}}
	server := model.Service.NewServer()
	// Nobody has connected yet (the address is printed below): the handler
	// can still be wrapped safely.
	server.Config.Handler = counter.wrap(server.Config.Handler)
	model.Service.ServeMux.HandleFunc("/qrm/soap-calls", counter.serve)
	model.Service.ServeMux.HandleFunc("/qrm/faults", counter.serveFaults)
	model.Service.ServeMux.HandleFunc("/qrm/task-delay", serveTaskDelay)

	endpoint := *server.URL
	endpoint.User = nil
	ready, _ := json.Marshal(map[string]interface{}{
		"url": endpoint.String(), "username": *user, "password": *pass, "pid": os.Getpid(),
	})
	fmt.Printf("QRM_VCSIM %s\n", ready)
	_ = os.Stdout.Sync()

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	// Leave at once: the temporary datastore directories go, open client
	// connections are not waited for.
	model.Remove()
	os.Exit(0)
}
