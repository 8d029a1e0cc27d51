package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/sendonce/sendonce/internal/config"
	"github.com/sendonce/sendonce/internal/httpapi"
	"github.com/sendonce/sendonce/internal/service"
)

// http starts the real service in-process (SQLite ledger and maildir
// delivery in Dir, SMTP submission off, its dispatcher running) and drives
// POST /v1/emails, or POST /v1/emails/batch of HTTPBatchSize emails, with
// keep-alive clients. The ceiling is the library path in the same run.
func (b *bencher) http(ctx context.Context, batch bool) ([]Row, error) {
	cfg := config.Default()
	cfg.Data = filepath.Join(b.opts.Dir, fmt.Sprintf("service-%d", b.seq.Add(1)))
	cfg.HTTP.Addr = "127.0.0.1:0"
	cfg.Submission.Addr = "off"
	cfg.Transport = "maildir"
	svc, err := service.New(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	var runErr error
	wg.Go(func() { runErr = svc.Run(runCtx) })
	stopSvc := func() error { stop(); wg.Wait(); return runErr }
	defer stopSvc()

	tr := &http.Transport{MaxIdleConns: b.opts.Concurrency, MaxIdleConnsPerHost: b.opts.Concurrency, IdleConnTimeout: time.Minute}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: time.Minute}
	base := "http://" + svc.HTTPAddr()
	e := b.email()
	single, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	post := func(ctx context.Context, path, key string, body []byte) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+path, bytes.NewReader(body))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		if key != "" {
			req.Header.Set("Idempotency-Key", key)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("POST %s: %s: %s", path, resp.Status, got)
		}
		return nil
	}
	var row Row
	if batch {
		row, err = b.drive(ctx, PathHTTPBatch, b.opts.Concurrency, func(ctx context.Context, _ int) (int, error) {
			req := httpapi.BatchRequest{Emails: make([]httpapi.BatchItem, HTTPBatchSize)}
			for i := range req.Emails {
				req.Emails[i] = httpapi.BatchItem{Key: b.key("http"), Email: e}
			}
			body, err := json.Marshal(req)
			if err != nil {
				return 0, err
			}
			return HTTPBatchSize, post(ctx, "/v1/emails/batch", "", body)
		})
		row.Note = fmt.Sprintf("latency per request of %d emails", HTTPBatchSize)
	} else {
		row, err = b.drive(ctx, PathHTTP, b.opts.Concurrency, func(ctx context.Context, _ int) (int, error) {
			return 1, post(ctx, "/v1/emails", b.key("http"), single)
		})
	}
	if err != nil {
		return nil, err
	}
	if err := stopSvc(); err != nil {
		return nil, err
	}
	tr.CloseIdleConnections()
	row.Ceiling = PathLibrary
	lib, err := b.libraryRow(ctx)
	if err != nil {
		return nil, err
	}
	lib.Note = "ceiling: the library path in the same run"
	return []Row{row, lib}, nil
}
